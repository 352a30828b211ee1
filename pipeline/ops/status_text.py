"""``hutch status``'s text: the report of :mod:`pipeline.ops.status` as tables and notes.

Kept apart from the gathering: what is read (management API, workers' metrics) there,
how it reads to an operator here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.ops import worker_configs as configs_of
from pipeline.ops.tenant_status import tenant_table

if TYPE_CHECKING:
    from pipeline.ops.status import BackendStatus, StatusReport

__all__ = ["format_status"]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return str(value)


def _table(header: list[str], rows: list[list[str]], numeric: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [cell.rjust(width) if i in numeric else cell.ljust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _lease(report: StatusReport, backend: BackendStatus) -> str:
    """Who holds the backend's lease, as far as the metrics read can tell."""
    if backend.holders:
        return ", ".join(backend.holders)
    if backend.owner is not None:
        return backend.owner  # the broker knows, metrics or not
    if not report.workers:
        return "-"  # no metrics asked for, and the broker named no owner
    # A worker whose metrics were not read may hold it: say so rather than "nobody".
    return "unknown" if report.unread_workers else "nobody"


def _tables(report: StatusReport) -> list[str]:
    """Pools, backends, the other queues."""
    pools = [q for q in report.queues if q.role == "work"]
    rows = [[q.pool or "-", q.name,
             "missing" if not q.exists else ("paused" if q.paused else "running"),
             _cell(q.messages), _cell(q.ready), _cell(q.unacked), _cell(q.consumers),
             _cell(None if q.backlog_tokens is None else round(q.backlog_tokens)),
             _cell(None if q.wait_s is None else f"{q.wait_s:.1f}s"),
             _cell(q.policy)] for q in pools]
    lines = _table(["POOL", "QUEUE", "STATE", "MESSAGES", "READY", "UNACKED", "CONSUMERS",
                    "BACKLOG TOKENS", "EST. WAIT", "POLICY"], rows, {3, 4, 5, 6, 7, 8})
    lines.append("")
    rows = [[b.name, b.pool, _cell(b.in_flight), _cell(b.capacity), str(b.max_concurrency),
             _cell(b.state), _lease(report, b)] for b in report.backends]
    lines += _table(["BACKEND", "POOL", "IN FLIGHT", "CAPACITY", "MAX", "STATE",
                     "LEASE HELD BY"], rows, {2, 3, 4})
    lines.append("")
    others = [q for q in report.queues if q.role != "work"]
    rows = [[q.name, q.role, _cell(q.messages) if q.exists else "missing",
             _cell(q.consumers) if q.exists else "-"] for q in others]
    lines += _table(["QUEUE", "ROLE", "MESSAGES", "CONSUMERS"], rows, {2, 3})
    if report.tenants:
        header, rows = tenant_table(report.tenants)
        lines += ["", *_table(header, rows, {2, 4, 5, 6})]
    if report.configs:
        header, rows = configs_of.config_table(report.configs, report.config_hash)
        lines += ["", *_table(header, rows, {1})]
    return lines


def _worker_notes(report: StatusReport) -> list[str]:
    """Live workers, the metrics read, and leases held twice or by nobody."""
    lines: list[str] = []
    live = report.live_workers
    if live is not None:
        presence = report.queue("workers").name
        lines.append(f"live workers: {live} (consumers of {presence})")
        if report.workers and live != len(report.workers):
            lines.append(f"{len(report.workers)} metrics URL(s) given for {live} live "
                         "worker(s): the backend table covers only the URLs given")
    if not report.workers:
        lines.append("in flight and capacity need the workers' metrics: pass --metrics URL "
                     "for each worker (its --metrics-port)")
    for worker in report.workers:
        if worker.error is not None:
            lines.append(f"worker metrics {worker.url}: not read ({worker.error}); leases "
                         "it may hold show as unknown")
    for b in report.backends:
        if len(b.holders) > 1:
            lines.append(f"backend {b.name}: {len(b.holders)} workers report its lease "
                         "(expected one)")
        elif report.workers and not b.holders and not report.unread_workers:
            lines.append(f"backend {b.name}: no worker holds its lease (nobody serves it)")
    return lines


def format_status(report: StatusReport) -> str:
    """The report as three tables: pools, backends, the other queues; then notes."""
    lines = [*_tables(report), ""]
    parked = report.parked
    if parked.exists:
        count = parked.messages
        size = "unknown" if count is None else f"{count} message{'s' if count != 1 else ''}"
        lines.append(f"parking lot {parked.name}: {size}")
    for name in report.missing:
        lines.append(f"queue {name} does not exist: run `hutch topology apply`")
    lines += _worker_notes(report)
    lines += configs_of.config_notes(report.configs, report.config_hash)
    lines.append(report.stats.note())
    return "\n".join(lines)
