"""Scenario ``partition``: what a network partition does to a backend's cap, and to requests.

Hutch's cap is a lease (an exclusive queue): one worker consumes for a backend at a time.
The docs warned that in a partition the minority side can keep the lease while the
majority grants it again, so a backend "may briefly see up to twice its cap". This
scenario measures it on a three-node cluster of its own (:mod:`hutch_bench.cluster_nodes`;
the broker it was pointed at is not used), for each pool type (``--queue-types``) under
each ``cluster_partition_handling`` (``--modes``): one case each
(:mod:`~hutch_bench.scenarios.partition_case` has the layout and the timeline).

Reported per case: the backend's exact peak concurrency, per phase (before, during the
partition, after the heal, after the repair) the highest sampled concurrency and the
seconds above the cap; whether every request got exactly one answer (the client counts
the duplicates it drops), how many the backend served twice; how RabbitMQ saw the
partition (the minority paused and resumed, or the partition recorded on each side).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, TextIO
from urllib.parse import urlsplit

from hutch_bench.cluster_nodes import BenchNodes
from hutch_bench.scenarios.common import Target, format_targets, print_lines, targets_report
from hutch_bench.scenarios.partition_case import run_case
from hutch_bench.scenarios.partition_options import PartitionOptions

__all__ = ["PartitionOptions", "case_lines", "case_targets", "run"]

def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def case_lines(case: dict[str, Any], cap: int) -> list[str]:
    """A case's figures, a few lines."""
    fault, errors = case["fault"], sum(case["errors"].values())
    lines = [f"  {case['queue_type']} pool, {case['mode']}: {case['answered']} of "
             f"{case['sent']} answered, {errors} errors, {case['duplicate_replies_dropped']} "
             f"duplicate answers dropped by the client, {case['served_twice']} served twice "
             f"by the backend; peak concurrency {case['max_concurrency']} (cap {cap})"]
    for phase in case["phases"]:
        lines.append(f"    {phase['phase']:9s} {phase['from_s']:6.1f}-{phase['to_s']:6.1f} s: "
                     f"max {phase['max_sampled']:3d}, above cap for "
                     f"{phase['over_cap_s']:.1f} s, below it for {phase['below_cap_s']:.1f} s")
    lines.append(f"    RabbitMQ: partitioned at {_s(fault['partitioned_s'])}, healed at "
                 f"{_s(fault['healed_s'])}; minority paused at {_s(fault['paused_seen_s'])}, "
                 f"stopped after the heal at {_s(fault['stopped_after_heal_s'])}, running "
                 f"again at {_s(fault['resumed_s'])}; repaired (stop_app/start_app) "
                 f"{_s(fault['repair_started_s'])}-{_s(fault['repaired_s'])}; partitions "
                 f"recorded {fault['partitions'] or '-'}; leases taken {case['leases_taken']}")
    return lines


def case_targets(case: dict[str, Any]) -> list[Target]:
    """What must hold whatever the mode: one answer per request, the partition seen."""
    name = f"{case['queue_type']}/{case['mode']}"
    fault = case["fault"]
    seen = {"pause_minority": fault["paused_seen_s"] is not None and
            fault["resumed_s"] is not None,
            "ignore": bool(fault["partitions"]),
            "autoheal": fault["stopped_after_heal_s"] is not None and
            fault["resumed_s"] is not None}
    return [
        Target(f"{name}: every request answered once",
               f"{case['answered']} of {case['sent']}, {sum(case['errors'].values())} errors, "
               f"{case['duplicate_replies_dropped']} duplicates dropped",
               case["answered"] == case["sent"] > 0),
        Target(f"{name}: RabbitMQ saw the partition",
               f"paused {_s(fault['paused_seen_s'])}, partitions {fault['partitions']}",
               seen[case["mode"]]),
    ]


async def run(amqp_url: str, options: PartitionOptions, out: TextIO) -> dict[str, Any]:
    print(f"partition: one backend of {options.cap} slots x {options.service_ms:g} ms at "
          f"{options.load:g}x its capacity ({options.rate:.1f} req/s), a worker on each side; "
          f"the node of the lease holder cut off at {options.partition_at_s:g} s for "
          f"{options.partition_s:g} s; on a three-node cluster of this run's own (the broker "
          f"at {urlsplit(amqp_url).netloc.rsplit('@', 1)[-1]} is not used)",
          file=out, flush=True)
    cases = []
    async with BenchNodes(3, timeout_s=options.node_timeout_s, standalone=False) as nodes:
        version = await nodes.cluster[0].version()
        print(f"  nodes up: RabbitMQ {version}, "
              f"{', '.join(n.nodename for n in nodes.cluster)}", file=out, flush=True)
        for queue_type in options.queue_type_list:
            for mode in options.mode_list:
                case = await run_case(nodes.cluster, queue_type, mode, options)
                print_lines(case_lines(case, options.cap), out)
                cases.append(case)
    targets = [t for case in cases for t in case_targets(case)]
    print_lines(["targets:", *format_targets(targets)], out)
    return {"scenario": "partition",
            "title": "A network partition: the backend's concurrency and the requests",
            "config": asdict(options), "rabbitmq_version": version, "cases": cases,
            "targets": targets_report(targets)}
