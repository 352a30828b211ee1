"""PNG plots of scenario reports (matplotlib, the ``bench`` extra).

Drawn from the report dicts the scenarios return and write with ``--json``, so a plot can
be redrawn from a saved run (``hutch bench plot FILE.json``) without running it again.
matplotlib is imported on first use: the rest of ``hutch bench`` works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hutch_bench.plot_capacity import plot_capacity
from pipeline.errors import ConfigError

__all__ = [
    "plot_backlog",
    "plot_failover",
    "plot_latency_over_time",
    "plot_report",
    "plot_service",
    "plot_stream_sweep",
    "plot_throughput",
    "require_matplotlib",
]

_CLASS_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple")
_STYLES = {"p50": ":", "p95": "--", "p99": "-"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'hutch[bench]' (or run "
                          "without --plot-dir)") from None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    return plt


def require_matplotlib() -> None:
    """Fail before a long run, not after it, when its plots could not be drawn."""
    _pyplot()


def plot_latency_over_time(series: dict[str, list[dict[str, Any]]], path: Path, *,
                           title: str, service_ms: float | None = None) -> Path:
    """End-to-end p50/p95/p99 per priority class, by send time (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for colour, (name, points) in zip(_CLASS_COLOURS, series.items(), strict=False):
        for key, style in _STYLES.items():
            xs = [p["t_s"] for p in points if p[key] is not None]
            ys = [p[key] for p in points if p[key] is not None]
            ax.plot(xs, ys, style, color=colour, label=f"{name} {key}")
    if service_ms is not None:
        ax.axhline(service_ms, color="grey", linewidth=0.8)
        ax.annotate(f"service time {service_ms:g} ms", (0, service_ms), color="grey",
                    textcoords="offset points", xytext=(2, 3), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("send time (s from start)")
    ax.set_ylabel("end-to-end latency (ms, log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(curves: dict[str, list[dict[str, Any]]], path: Path, *,
                    title: str) -> Path:
    """Left: achieved vs offered requests/s per system, with the y = x diagonal. Right:
    p50 and p99 latency vs offered load (where the knee is)."""
    plt = _pyplot()
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(13, 5))
    top = 0.0
    for colour, (name, points) in zip(_CLASS_COLOURS[1:] + _CLASS_COLOURS[:1],
                                      curves.items(), strict=False):
        xs = [p["offered_rps"] for p in points]
        ys = [p["achieved_rps"] for p in points]
        ax.plot(xs, ys, "o-", color=colour, label=name)
        top = max(top, *xs, *ys)
        for key, style in (("p50", ":"), ("p99", "-")):
            shown = [(p["offered_rps"], p["latency_ms"][key]) for p in points
                     if p.get("latency_ms", {}).get(key) is not None]
            if shown:
                lat.plot(*zip(*shown, strict=True), style, marker="o", markersize=3,
                         color=colour, label=f"{name} {key}")
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle="--",
            label="achieved = offered")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("achieved throughput (answers/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    lat.set_yscale("log")
    lat.set_xlabel("offered load (requests/s)")
    lat.set_ylabel("end-to-end latency (ms, log)")
    lat.set_title("Latency vs offered load")
    lat.grid(True, which="both", alpha=0.3)
    if lat.get_legend_handles_labels()[0]:  # a saved report may have no latencies
        lat.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_backlog(samples: list[dict[str, Any]], path: Path, *, title: str,
                 rss_limit_mib: float | None = None) -> Path:
    """Queue depth (left axis) and the worker's RSS (right axis) while a backlog drains."""
    plt = _pyplot()
    fig, depth = plt.subplots(figsize=(9, 5))
    ts = [s["t_s"] for s in samples]
    depth.plot(ts, [s["queue_depth"] for s in samples], color="tab:blue", label="queued")
    depth.set_xlabel("time since the worker started (s)")
    depth.set_ylabel("requests queued", color="tab:blue")
    depth.set_ylim(bottom=0)
    rss = depth.twinx()
    shown = [(s["t_s"], s["rss_mib"]) for s in samples if s["rss_mib"] is not None]
    if shown:
        rss.plot(*zip(*shown, strict=True), color="tab:red", label="worker RSS")
    if rss_limit_mib is not None:
        rss.axhline(rss_limit_mib, color="tab:red", linewidth=0.8, linestyle="--")
        rss.annotate(f"target {rss_limit_mib:g} MiB", (0, rss_limit_mib), color="tab:red",
                     textcoords="offset points", xytext=(2, -12), fontsize=8)
        rss.set_ylim(0, rss_limit_mib * 1.1)
    rss.set_ylabel("worker RSS (MiB)", color="tab:red")
    depth.set_title(title)
    depth.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stream_sweep(sweep: dict[str, list[dict[str, Any]]], path: Path, *, title: str,
                      gap_limit_ms: float | None = None) -> Path:
    """Left: inter-token gap p99 vs concurrent streams per path, with the limit a step
    must stay under (the p50 of a coalesced path is ~0: tokens arrive together). Right:
    time to first token p50/p99 (where queueing starts)."""
    plt = _pyplot()
    fig, (gap, ttft) = plt.subplots(1, 2, figsize=(13, 5))
    for colour, (name, rows) in zip(_CLASS_COLOURS[1:] + _CLASS_COLOURS[:1],
                                    sweep.items(), strict=False):
        for ax, figure, styles in ((gap, "gap_ms", {"p99": "-"}),
                                   (ttft, "ttft_ms", {"p50": ":", "p99": "-"})):
            for key, style in styles.items():
                shown = [(r["concurrency"], r[figure][key]) for r in rows
                         if r.get(figure, {}).get(key) is not None]
                if shown:
                    ax.plot(*zip(*shown, strict=True), style, marker="o", markersize=3,
                            color=colour, label=f"{name} {key}")
    if gap_limit_ms is not None:
        gap.axhline(gap_limit_ms, color="grey", linewidth=0.8, linestyle="--")
        gap.annotate(f"limit {gap_limit_ms:g} ms", (0, gap_limit_ms), color="grey",
                     xycoords=("axes fraction", "data"), textcoords="offset points",
                     xytext=(2, 3), fontsize=8)
    for ax, label, heading in ((gap, "inter-token gap at the client (ms, log)", title),
                               (ttft, "time to first token (ms, log)",
                                "Time to first token vs concurrent streams")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["concurrency"] for rows in sweep.values() for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("concurrent streams (log)")
        ax.set_ylabel(label)
        ax.set_title(heading)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_failover(timeline: list[dict[str, Any]], killed_at_s: float, path: Path, *,
                  title: str) -> Path:
    """Top: answers per second by answer time. Bottom: their latency, p50 and max (log).
    A vertical line marks the kill (the cluster scenario's failover)."""
    plt = _pyplot()
    fig, (rate, lat) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ts = [p["t_s"] for p in timeline]
    rate.step(ts, [p["answers_per_s"] for p in timeline], where="post", color="tab:blue")
    rate.set_ylabel("answers/s")
    rate.set_ylim(bottom=0)
    rate.set_title(title)
    for key, style in (("p50_ms", ":"), ("max_ms", "-")):
        shown = [(p["t_s"], p[key]) for p in timeline if p[key] is not None]
        if shown:
            lat.plot(*zip(*shown, strict=True), style, color="tab:red",
                     label=key.removesuffix("_ms"))
    lat.set_yscale("log")
    for set_formatter in (lat.yaxis.set_major_formatter, lat.yaxis.set_minor_formatter):
        set_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    lat.set_xlabel("answer time (s from the start of the load)")
    lat.set_ylabel("end-to-end latency (ms, log)")
    for ax in (rate, lat):
        ax.axvline(killed_at_s, color="black", linewidth=0.8, linestyle="--")
        ax.grid(True, which="both", alpha=0.3)
    rate.annotate("kill -9", (killed_at_s, 0), textcoords="offset points", xytext=(3, 3),
                  fontsize=8)
    if lat.get_legend_handles_labels()[0]:
        lat.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_service(service: dict[str, dict[str, Any]], path: Path, *, title: str,
                 marks: dict[str, float] | None = None) -> Path:
    """Cumulative service per tenant over time (weighted tokens), one row per phase and
    one column per policy (the fairness scenario); ``marks``: a vertical line per phase
    (when a tenant joined)."""
    plt = _pyplot()
    phases = list(service)
    policies = list(next(iter(service.values())))
    fig, axes = plt.subplots(len(phases), len(policies), figsize=(6 * len(policies),
                             4 * len(phases)), squeeze=False, sharey="row")
    for row, phase in enumerate(phases):
        for col, policy in enumerate(policies):
            ax, data = axes[row][col], service[phase][policy]
            for colour, (tenant, values) in zip(_CLASS_COLOURS, data["tenants"].items(),
                                                strict=False):
                ax.plot(data["t_s"], [v / 1000 for v in values], color=colour,
                        label=tenant)
            if marks and phase in marks:
                ax.axvline(marks[phase], color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(f"{phase}: policy {policy}", fontsize=10)
            ax.set_xlabel("time (s from the start of the load)")
            ax.set_ylabel("service (k weighted tokens)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """The plots a scenario report has data for, written into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    name = report.get("scenario", "run")
    written: list[Path] = []
    if report.get("series"):
        written.append(plot_latency_over_time(
            report["series"], directory / f"{name}-latency.png",
            title=report.get("title", name), service_ms=report.get("service_ms")))
    if report.get("sweep"):
        written.append(plot_throughput(report["sweep"], directory / f"{name}-throughput.png",
                                       title=report.get("title", name)))
    if report.get("stream_sweep"):
        written.append(plot_stream_sweep(
            report["stream_sweep"], directory / f"{name}-streams.png",
            title=report.get("title", name),
            gap_limit_ms=report.get("config", {}).get("gap_limit_ms")))
    if report.get("failover", {}).get("timeline"):
        written.append(plot_failover(
            report["failover"]["timeline"], report["failover"]["killed_at_s"],
            directory / f"{name}-failover.png", title=f"{report.get('title', name)}: "
            "kill -9 of the work queue leader's node"))
    if report.get("service"):
        written.append(plot_service(
            report["service"], directory / f"{name}-service.png",
            title=f"{report.get('title', name)}: cumulative service per tenant",
            marks={"noisy": report.get("config", {}).get("join_at_s", 0.0)}))
    if report.get("samples"):
        written.append(plot_backlog(
            report["samples"], directory / f"{name}-drain.png",
            title=report.get("title", name),
            rss_limit_mib=report.get("config", {}).get("rss_limit_mib")))
    if report.get("soak_samples"):
        from hutch_bench.scenarios.soak_plot import plot_soak  # it imports this module

        written.append(plot_soak(report, directory / f"{name}-resources.png"))
    if name == "capacity" and report.get("adaptive"):
        written.append(plot_capacity(report, directory / f"{name}-limit.png",
                                     pyplot=_pyplot()))
    return written
