"""Operating a running Hutch: what the operator's commands do (the CLI only parses).

- :mod:`pipeline.ops.status`: ``hutch status``, queues and backends at a glance;
- :mod:`pipeline.ops.dlq`: ``hutch dlq``, list, replay and purge the parking lot;
- :mod:`pipeline.ops.pools`: ``hutch pool``, list, pause and resume pools the broker has;
- :mod:`pipeline.ops.demo`: ``hutch demo``, priorities overtaking a saturated backlog.
"""
