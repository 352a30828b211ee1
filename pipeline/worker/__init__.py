"""The worker side: consume the work queues, one consumer per backend, under a lease.

- :mod:`pipeline.worker.worker`: :class:`~pipeline.worker.worker.Worker`, the connection
  supervisor that drives everything below through explicit commands;
- :mod:`pipeline.worker.lease`: the exclusive lease queue of a backend, and the holder that
  serves the backend while it has it;
- :mod:`pipeline.worker.capacity`: keeps the consumer's prefetch equal to the free slots;
- :mod:`pipeline.worker.health`: what dispatch reports about a backend (the gate);
- :mod:`pipeline.worker.presence`: the live-worker count (fair share of leases);
- :mod:`pipeline.worker.consumer`: a consumer that knows its in-flight deliveries;
- :mod:`pipeline.worker.pause`: the pause flags of pools;
- :mod:`pipeline.worker.triage`: answers what the broker dead-lettered or could not route;
- :mod:`pipeline.worker.handlers`: wires publisher, settler, hooks, triage, dispatchers.
"""
