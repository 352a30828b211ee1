"""The mock backend's command-line options, shared by ``hutch mock-backend`` and
``python -m pipeline.testing.mock``.

Kept apart from the server so a CLI can register the options without importing aiohttp.
"""

from __future__ import annotations

import argparse

from pipeline.testing.mock.config import FAULT_FIELDS, MockConfig
from pipeline.testing.mock.engine_config import EngineConfig

__all__ = ["add_arguments", "config_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mock backend's options to ``parser``."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8001, help="port to bind, 0 = any free (default: %(default)s)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="latency per request (default: %(default)s)"
    )
    parser.add_argument(
        "--capacity", type=int, default=4, help="requests served at once (default: %(default)s)"
    )
    parser.add_argument(
        "--models",
        default="mock-small,mock-large",
        help="comma-separated model names (default: %(default)s)",
    )
    _add_stream_arguments(parser.add_argument_group(
        "streaming and replies", '"stream": true is answered with server-sent events'
    ))
    _add_fault_arguments(parser.add_argument_group(
        "fault injection", "none by default; change them at runtime with POST /faults"
    ))
    _add_engine_arguments(parser.add_argument_group(
        "realistic engine",
        "with --realistic, chat requests share a KV budget, slow down as the batch grows, "
        "wait inside the mock beyond it, and GET /metrics serves vLLM's metrics; change "
        "the capacity at runtime with POST /admin/capacity",
    ))


def _add_engine_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = EngineConfig()
    group.add_argument(
        "--realistic", action="store_true",
        help="behave like a continuous-batching server such as vLLM (--capacity and "
             "--latency-ms then no longer apply to chat requests)",
    )
    group.add_argument(
        "--kv-tokens", type=int, default=defaults.kv_tokens,
        help="KV budget: prompt plus generated tokens of running requests "
             "(default: %(default)s)",
    )
    group.add_argument(
        "--max-running", type=int, default=defaults.max_running,
        help="requests in the batch at most (default: %(default)s)",
    )
    group.add_argument(
        "--tpot-ms", type=float, default=defaults.tpot_ms,
        help="time per output token of a lone request (default: %(default)s)",
    )
    group.add_argument(
        "--batch-slowdown", type=float, default=defaults.batch_slowdown,
        help="each other running request adds this fraction of --tpot-ms to every token "
             "(default: %(default)s)",
    )
    group.add_argument(
        "--preempt", action="store_true",
        help="admit a request when its prompt fits, and pause the newest running one when "
             "the KV budget runs out (vLLM's recompute preemption); without it a request "
             "waits until its whole length fits",
    )


def _add_stream_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--ttft-ms", type=float, default=None,
        help="time to first token of a streamed reply (default: --latency-ms)",
    )
    group.add_argument(
        "--itl-ms", type=float, default=0.0,
        help="time between two tokens of a streamed reply (default: %(default)s)",
    )
    group.add_argument(
        "--jitter", type=float, default=0.0,
        help="scale each delay (latency, time to first token, inter-token) by a random "
             "factor in 1 +/- this fraction, "
             "seeded by --seed (default: %(default)s)",
    )
    group.add_argument(
        "--reply-tokens", type=int, default=None,
        help="tokens of a reply; a request's max_tokens then sets its length "
             "(default: echo the last message, cut at max_tokens)",
    )
    group.add_argument(
        "--ids-kept", type=int, default=1000,
        help="served and aborted request ids kept for GET /stats (default: %(default)s)",
    )


def _add_fault_arguments(faults: argparse._ArgumentGroup) -> None:
    faults.add_argument(
        "--fail-rate", type=float, default=0.0,
        help="fraction of requests answered with --fail-status (default: %(default)s)",
    )
    faults.add_argument(
        "--fail-status", type=int, default=500,
        help="HTTP status of injected failures, 400..599 (default: %(default)s)",
    )
    faults.add_argument(
        "--fail-first", type=int, default=0,
        help="the first N requests fail with --fail-status (default: %(default)s)",
    )
    faults.add_argument(
        "--throttle-rate", type=float, default=0.0,
        help="fraction of requests answered 429 with Retry-After (default: %(default)s)",
    )
    faults.add_argument(
        "--retry-after", type=float, default=1.0, dest="retry_after_s",
        help="Retry-After seconds of throttled requests (default: %(default)s)",
    )
    faults.add_argument(
        "--hang-rate", type=float, default=0.0,
        help="fraction of requests that hold their slot for --hang-s (default: %(default)s)",
    )
    faults.add_argument(
        "--hang-s", type=float, default=3600.0,
        help="how long a hanging request hangs before answering (default: %(default)s)",
    )
    faults.add_argument(
        "--cut-rate", type=float, default=0.0,
        help="fraction of streamed replies whose connection is closed mid-stream "
             "(default: %(default)s)",
    )
    faults.add_argument(
        "--malformed-rate", type=float, default=0.0,
        help="fraction of streamed replies with a data: line that is not JSON "
             "(default: %(default)s)",
    )
    faults.add_argument(
        "--stall-rate", type=float, default=0.0,
        help="fraction of streamed replies that stop for --hang-s between two chunks "
             "(default: %(default)s)",
    )
    faults.add_argument(
        "--fault-after-tokens", type=int, default=1,
        help="tokens sent before a stream fault strikes (default: %(default)s)",
    )
    faults.add_argument(
        "--seed", type=int, default=None,
        help="seed of the random fault choices and the jitter (default: unpredictable)",
    )


def config_from_args(args: argparse.Namespace) -> MockConfig:
    """The configuration the options ask for; raises ValueError on a bad one."""
    models = tuple(name.strip() for name in str(args.models).split(",") if name.strip())
    # Fault options may be absent from a namespace built by another parser.
    faults = {name: getattr(args, name) for name in FAULT_FIELDS if hasattr(args, name)}
    pace = {name: getattr(args, name) for name in _PACE_FIELDS if hasattr(args, name)}
    return MockConfig(latency_ms=args.latency_ms, capacity=args.capacity, models=models,
                      engine=_engine_from_args(args), **pace, **faults)


def _engine_from_args(args: argparse.Namespace) -> EngineConfig | None:
    """The realistic engine the options ask for (None without ``--realistic``)."""
    if not getattr(args, "realistic", False):
        return None
    return EngineConfig(kv_tokens=args.kv_tokens, max_running=args.max_running,
                        tpot_ms=args.tpot_ms, batch_slowdown=args.batch_slowdown,
                        preempt=args.preempt)


#: The streaming and reply options (absent from a namespace built by another parser).
_PACE_FIELDS = ("ttft_ms", "itl_ms", "jitter", "reply_tokens", "ids_kept")
