"""Hutch's public Python API: what a program that sends requests through Hutch needs.

    import hutch

    async with hutch.HutchClient("amqps://app:secret@rabbit.example/",
                                 tls=hutch.TLSFiles(ca_file="ca.pem")) as client:
        completion = await client.chat(model="llama-3-8b",
                                       messages=[{"role": "user", "content": "hi"}])

The client (:class:`HutchClient`, its streams :class:`ChatStream`, its replies), the TLS
files of an ``amqps://`` connection (:class:`TLSFiles`), the configuration a client can
be built from (:class:`Settings`, :func:`load_settings`, ``HutchClient.from_settings``),
the OpenAI shapes it returns, and the errors a client can see. Nothing of the worker, the
mock backend or the benchmarks is imported: they live in ``pipeline`` (the
implementation; its modules may change between releases) and ``hutch_bench``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pipeline.broker.tls import TLSFiles
from pipeline.client.client import HutchClient
from pipeline.client.replies import RawReply, Reply
from pipeline.client.stream import ChatStream
from pipeline.errors import (
    BackendError,
    BrokerAccessError,
    BrokerAuthError,
    BrokerBlockedError,
    BrokerConnectionError,
    BrokerTLSError,
    BrokerUnreachableError,
    ConfigError,
    DeadlineExceededError,
    HutchError,
    InvalidRequestError,
    QueueFullError,
    QuotaExceededError,
    RequestCancelledError,
    RequestFailed,
    StreamInterruptedError,
    TopologyError,
    UnknownModelError,
)
from pipeline.models import ChatCompletion, ChatCompletionChunk, ChatMessage, QueueStatus
from pipeline.settings import Settings, load_settings

__all__ = [
    "BackendError",
    "BrokerAccessError",
    "BrokerAuthError",
    "BrokerBlockedError",
    "BrokerConnectionError",
    "BrokerTLSError",
    "BrokerUnreachableError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChatStream",
    "ConfigError",
    "DeadlineExceededError",
    "HutchClient",
    "HutchError",
    "InvalidRequestError",
    "QueueFullError",
    "QueueStatus",
    "QuotaExceededError",
    "RawReply",
    "Reply",
    "RequestCancelledError",
    "RequestFailed",
    "Settings",
    "StreamInterruptedError",
    "TLSFiles",
    "TopologyError",
    "UnknownModelError",
    "__version__",
    "load_settings",
]

try:
    __version__: str = version("hutch")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
