"""The soak's plot: memory, descriptors and broker connections over time.

Drawn from the report's ``soak_samples`` (so ``hutch bench plot`` redraws it from a saved
``--json``). Grey lines mark worker-b's restarts (dashed: kill -9), the shaded span is the
warm-up the growth figures leave out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hutch_bench.plots import _pyplot
from hutch_bench.scenarios.soak_figures import series_values

__all__ = ["plot_soak"]

_PANELS = (
    ("resident memory (MiB)", (("worker-a", "rss_mib"), ("worker-b", "rss_mib"),
                               ("gateway", "rss_mib"), ("bench", "rss_mib"))),
    ("broker memory (MiB; the node's, shared)", (
        ("broker", "rss_mib"), ("broker", "mem_used_mib"),
        ("broker", "our_queues_memory_mib"))),
    ("open file descriptors", (("worker-a", "fds"), ("worker-b", "fds"),
                               ("gateway", "fds"), ("bench", "fds"), ("broker", "fd_used"))),
    ("broker connections", (("broker", "our_connections"), ("broker", "connections"),
                            ("worker-a", "amqp_connections"),
                            ("gateway", "amqp_connections"))),
)


def plot_soak(report: dict[str, Any], path: Path) -> Path:
    """Four panels over the run's time, restarts and warm-up marked."""
    plt = _pyplot()
    samples = report["soak_samples"]
    config = report.get("config", {})
    warm = config.get("duration_s", 0) / 3
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    for ax, (label, series) in zip(axes.flat, _PANELS, strict=True):
        for role, key in series:
            points = series_values(samples, role, key)
            if points:
                ax.plot([t for t, _ in points], [v for _, v in points], linewidth=1,
                        label=f"{role} {key}")
        ax.axvspan(0, warm, color="grey", alpha=0.1)
        for restart in report.get("restarts", []):
            ax.axvline(restart["t_s"], color="grey", linewidth=0.7,
                       linestyle="--" if restart["signal"] == "SIGKILL" else ":")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("time (s from start; shaded: warm-up; grey: worker-b restarts, "
                      "dashed kill -9)", fontsize=8)
    outcomes = report.get("outcomes", {})
    fig.suptitle(f"{report.get('title', 'soak')}: {outcomes.get('requests', 0)} requests, "
                 f"{outcomes.get('lost', 0)} lost, {outcomes.get('duplicated', 0)} "
                 "duplicated")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
