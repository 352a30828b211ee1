"""The ``fairness`` table's rows (fair and FIFO side by side) and issue 18's targets,
judged on the fair policy's figures (FIFO is the comparison)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hutch_bench.scenarios.common import Target

if TYPE_CHECKING:
    from hutch_bench.scenarios.fairness import FairnessOptions

__all__ = ["rows_and_targets"]

Row = tuple[str, str, str, str]
_Figures = dict[str, dict[str, dict[str, Any]]]


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
        return text + unit
    return f"{value}{unit}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


class _Rows:
    """Collects rows: a label, how to read a figure of each policy, the target text."""

    def __init__(self, figures: _Figures) -> None:
        self.figures = figures
        self.rows: list[Row] = []

    def add(self, label: str, phase: str, read: Callable[[dict[str, Any]], str],
            target: str = "") -> None:
        by_policy = self.figures.get(phase, {})
        cells = [read(by_policy[p]) if p in by_policy else "-" for p in ("fair", "fifo")]
        self.rows.append((label, cells[0], cells[1], target))


def _rows(figures: _Figures, o: FairnessOptions) -> list[Row]:
    limit = 2 * o.service_ms
    t = _Rows(figures)
    t.add("(a) quiet tenants: queue wait p99", "noisy",
          lambda f: _fmt(f["quiet_wait_p99_ms"], " ms"), f"< {limit:g} ms")
    t.add("(a) quiet tenants: TTFT p99 (streamed)", "noisy",
          lambda f: _fmt(f["quiet_ttft_p99_ms"], " ms"))
    t.add("(a) quiet answered / sent", "noisy",
          lambda f: f"{f['quiet_answered']}/{f['quiet_sent']}")
    t.add("(a) noisy answered / sent", "noisy",
          lambda f: f"{f['noisy_answered']}/{f['noisy_sent']}")
    t.add("(a) requests lost (no answer at all)", "noisy", lambda f: _fmt(f["lost"]), "0")
    t.add("(a) utilisation while backlogged", "noisy", lambda f: _pct(f["utilisation"]),
          ">= 97%")
    t.add("(b) joiner's share of service, first 3 s", "noisy",
          lambda f: _pct(f["join_share"]), "~50%, no burst")
    t.add("(b) joiner's excess over noisy, first 3 s", "noisy",
          lambda f: _fmt(f["join_excess"]), "<= VTC bound")
    t.add("(b) noisy's longest stretch unserved", "noisy",
          lambda f: _fmt(f["noisy_longest_idle_s"], " s"), "< 2 s")
    t.add("(b) noisy+late Jain (backlogged)", "noisy", lambda f: _fmt(f["joined"]["jain"]),
          "~1")
    t.add("(b) noisy+late largest gap / bound", "noisy",
          lambda f: f"{_fmt(f['joined']['max_gap'])} / {_fmt(f['joined']['bound'])}",
          "gap <= bound")
    return t.rows


def _rows_after(figures: _Figures, o: FairnessOptions) -> list[Row]:
    limit = 2 * o.service_ms
    t = _Rows(figures)
    t.add("(c) gold:bronze token ratio (w 2:1)", "weights", lambda f: _fmt(f["ratio"]),
          "2 +/- 0.1")
    t.add("(c) window both backlogged", "weights",
          lambda f: _fmt(f["window_length_s"], " s"),
          f">= {min(60.0, o.weights_s):g} s")
    t.add("(c) Jain, weight-normalised", "weights", lambda f: _fmt(f["jain"]), "~1")
    t.add("(c) largest gap / VTC bound", "weights",
          lambda f: f"{_fmt(f['max_gap'])} / {_fmt(f['bound'])}", "gap <= bound")
    t.add("(d) interactive queue wait p99", "weights",
          lambda f: _fmt(f["chat_wait_p99_ms"], " ms"), f"< {limit:g} ms")
    t.add("(d) interactive TTFT p99", "weights",
          lambda f: _fmt(f["chat_ttft_p99_ms"], " ms"))
    t.add("(e) one tenant saturating: answers/s", "saturate",
          lambda f: f"{f['throughput_rps']:.2f}", ">= 0.97x fifo")
    t.add("(e) one tenant saturating: utilisation", "saturate",
          lambda f: _pct(f["utilisation"]), ">= 97%")
    t.add("(e) light load: end-to-end p50", "light",
          lambda f: _fmt(f["latency_p50_ms"], " ms"), "+< 0.5 ms")
    t.add("(e) light load: end-to-end p99", "light",
          lambda f: _fmt(f["latency_p99_ms"], " ms"))
    t.add("(f) kill: answered / sent", "kill", lambda f: f"{f['answered']}/{f['sent']}",
          "all")
    t.add("(f) kill: duplicate answers dropped", "kill",
          lambda f: _fmt(f["dropped_replies"]), "0")
    t.add("(f) kill: token ratio one:two", "kill", lambda f: _fmt(f["ratio"]),
          "1 +/- 0.1")
    t.add("(f) kill: Jain", "kill", lambda f: _fmt(f["jain"]), "~1")
    t.add("(e) worker CPU per answer, saturated", "saturate",
          lambda f: _fmt(f["worker_cpu_ms_per_answer"], " ms"))
    t.add("short requests: utilisation", "short", lambda f: _pct(f["utilisation"]),
          ">= 97%")
    t.add("short requests: drain / ideal", "short",
          lambda f: f"{_fmt(f['drain_s'], ' s')} / {_fmt(f['ideal_drain_s'], ' s')}")
    t.add("short requests: worker CPU per answer", "short",
          lambda f: _fmt(f["worker_cpu_ms_per_answer"], " ms"))
    for phase in figures:
        t.add(f"{phase}: pool queue depth max / send lag p99", phase,
              lambda f: f"{_fmt(f['intake_max'])} / {_fmt(f['send_lag_p99_ms'], ' ms')}")
    return t.rows


def _target(name: str, figures: _Figures, phase: str, read: Callable[[dict[str, Any]], Any],
            show: Callable[[Any], str], ok: Callable[[Any], bool]) -> Target | None:
    fair = figures.get(phase, {}).get("fair")
    if fair is None:
        return None
    try:
        value = read(fair)
        return Target(name, show(value), value is not None and ok(value))
    except (TypeError, KeyError):  # a figure the run could not produce
        return Target(name, "no figure", False)


def _targets(figures: _Figures, o: FairnessOptions) -> list[Target]:
    limit = 2 * o.service_ms
    fifo_rps = figures.get("saturate", {}).get("fifo", {}).get("throughput_rps")
    fifo_p50 = figures.get("light", {}).get("fifo", {}).get("latency_p50_ms")
    ms = lambda v: _fmt(v, " ms")  # noqa: E731
    specs: list[tuple[str, str, Callable[[dict[str, Any]], Any], Callable[[Any], str],
                      Callable[[Any], bool]]] = [
        (f"noisy neighbour: quiet tenants' queue wait p99 < {limit:g} ms", "noisy",
         lambda f: f["quiet_wait_p99_ms"], ms, lambda v: v < limit),
        ("noisy neighbour: every request answered (or expired at its deadline)", "noisy",
         lambda f: f["lost"], lambda v: f"{v} lost", lambda v: v == 0),
        ("noisy neighbour: utilisation >= 97% while backlogged", "noisy",
         lambda f: f["utilisation"], _pct, lambda v: v >= 0.97),
        ("late joiner: no burst (excess over noisy, first 3 s, <= VTC bound)", "noisy",
         lambda f: (f["join_excess"], f["joined"]["bound"]),
         lambda v: f"{v[0]:.0f} (bound {v[1]:.0f})", lambda v: v[0] <= v[1]),
        ("late joiner: no starvation (noisy never unserved 2 s)", "noisy",
         lambda f: f["noisy_longest_idle_s"], lambda v: f"{v:.2f} s", lambda v: v < 2),
        ("noisy+late: largest service gap <= VTC bound", "noisy", lambda f: f["joined"],
         lambda v: f"{v['max_gap']:.0f} of {v['bound']:.0f}",
         lambda v: v["window_s"] is not None and v["max_gap"] <= v["bound"]),
        ("weights 2:1: token-service ratio 2 +/- 0.1", "weights",
         lambda f: (f["ratio"], f["window_length_s"]),
         lambda v: f"{_fmt(v[0])} over {_fmt(v[1], ' s')}",
         lambda v: v[0] is not None and abs(v[0] - 2) <= 0.1),
        ("weights 2:1: largest service gap <= VTC bound", "weights", lambda f: f,
         lambda v: f"{v['max_gap']:.0f} of {v['bound']:.0f}",
         lambda v: v["window_s"] is not None and v["max_gap"] <= v["bound"]),
        (f"bands: interactive queue wait p99 < {limit:g} ms", "weights",
         lambda f: f["chat_wait_p99_ms"], ms, lambda v: v < limit),
        ("saturated alone: throughput >= 0.97x fifo", "saturate",
         lambda f: f["throughput_rps"],
         lambda v: f"{v:.2f} vs {fifo_rps:.2f} answers/s",
         lambda v: fifo_rps is not None and v >= 0.97 * fifo_rps),
        ("light load: added p50 < 0.5 ms", "light", lambda f: f["latency_p50_ms"],
         lambda v: f"{v - (fifo_p50 or 0):+.2f} ms",
         lambda v: fifo_p50 is not None and v - fifo_p50 < 0.5),
        ("worker killed: every request answered once", "kill",
         lambda f: (f["answered"], f["sent"], f["dropped_replies"]),
         lambda v: f"{v[0]}/{v[1]}, {v[2]} duplicates dropped",
         lambda v: v[0] == v[1] and v[2] == 0),
        ("worker killed: token ratio 1 +/- 0.1", "kill", lambda f: f["ratio"], _fmt,
         lambda v: abs(v - 1) <= 0.1),
        ("short requests: utilisation >= 97%", "short", lambda f: f["utilisation"], _pct,
         lambda v: v >= 0.97),
    ]
    found = [_target(name, figures, phase, *rest) for name, phase, *rest in specs]
    return [t for t in found if t is not None]


def rows_and_targets(figures: _Figures, options: FairnessOptions
                     ) -> tuple[list[Row], list[Target]]:
    return _rows(figures, options) + _rows_after(figures, options), _targets(figures, options)
