"""The capacity scenario's plot: throughput and the adaptive limit over time.

Top: answers per second of the adaptive limit from a cold start, against the best fixed
cap's steady throughput (a line). Middle: the adaptive limit over that run. Bottom: the
limit while the server's room halves and comes back (the marks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_capacity"]


def plot_capacity(report: dict[str, Any], path: Path, *, pyplot: Any) -> Path:
    plt = pyplot
    fig, (rate, limit, halved) = plt.subplots(3, 1, figsize=(9, 8))
    adaptive = report["adaptive"]
    best = next(m for m in report["fixed"] if m["label"] == report["best_fixed"])
    seconds = list(range(len(adaptive["per_second"])))
    rate.step(seconds, adaptive["per_second"], where="post", color="tab:blue",
              label="adaptive (cold start)")
    rate.axhline(best["steady_rps"], color="tab:green", linestyle="--",
                 label=f"{best['label']} (best fixed), steady")
    rate.set_ylabel("answers/s")
    rate.set_ylim(bottom=0)
    rate.set_title("Adaptive limit against the best fixed cap (3x overload)")
    for ax, run, title in ((limit, adaptive, "adaptive limit, cold start"),
                           (halved, report["halving"]["measured"],
                            "adaptive limit, the server's room halved and restored")):
        points = run["limits"]
        if points:
            ax.step([t for t, _ in points], [v for _, v in points], where="post",
                    color="tab:red")
        ax.set_ylabel("limit")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
    for key in ("halved_at_s", "restored_at_s"):
        halved.axvline(report["halving"][key], color="black", linewidth=0.8, linestyle="--")
    halved.axhline(report["halving"]["halved_to"], color="grey", linewidth=0.8, linestyle=":")
    halved.set_xlabel("time (s from the start of the load)")
    for ax in (rate, limit, halved):
        ax.grid(True, alpha=0.3)
    rate.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
