"""One backend's settings: where it is, how much it takes, how its limit moves, and
whether its replicas are discovered by DNS.

Part of the settings model (:mod:`pipeline.settings` re-exports :class:`BackendSettings`);
kept apart so each module stays one screenful of concepts.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.settings_checks import check_limits, http_url

__all__ = ["CONSUMER_TIMEOUT_S", "BackendSettings"]

# Names end up in queue names, policy patterns and metric labels: keep them boring.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"

#: RabbitMQ closes a channel whose delivery stays unacked longer than this (its default).
CONSUMER_TIMEOUT_S = 30 * 60


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendSettings(_Strict):
    """One OpenAI-compatible HTTP endpoint and the slots it can serve at once."""

    name: str = Field(pattern=_NAME)
    url: str
    max_concurrency: int = Field(ge=1, le=10_000)
    #: ``fixed``: the backend always takes ``max_concurrency``. ``adaptive``: a limit
    #: between ``min_concurrency`` and ``max_concurrency`` that follows the backend's
    #: saturation metrics (``metrics_url``), its refusals and its latency (docs: Capacity).
    concurrency: Literal["fixed", "adaptive"] = "fixed"
    #: The adaptive limit's floor: it never goes below (1 keeps a backend probed).
    min_concurrency: int = Field(default=1, ge=1, le=10_000)
    #: Where an adaptive limit starts when a worker takes the backend's lease (default
    #: ``min(4, max_concurrency)``): a safe value, never the ceiling.
    start_concurrency: int | None = Field(default=None, ge=1, le=10_000)
    timeout_s: float = Field(default=60.0, gt=0, lt=CONSUMER_TIMEOUT_S)
    #: Name of the environment variable holding the API key; the key itself is never stored.
    api_key_env: str | None = None
    #: Pass the request's priority to a backend that schedules by it (vLLM with
    #: ``--scheduling-policy priority``): its body gets ``"priority": max_priority - p``
    #: (lower is served earlier there, the opposite of AMQP), unless it already has one.
    send_priority: bool = False
    #: What a 429 pauses: the whole ``backend``, or only the request's ``model`` there
    #: (proxies such as LiteLLM limit each model on its own: the others keep being served).
    throttle_scope: Literal["backend", "model"] = "backend"
    #: The backend's Prometheus metrics URL (vLLM, SGLang: ``http://host:port/metrics``;
    #: llama.cpp with ``--metrics``), read for its saturation: requests running and waiting
    #: inside it, KV cache use. Unset: not read. Unreadable or stale metrics count as unknown.
    metrics_url: str | None = None
    #: ``dns``: the host of ``url`` names the backend's replicas (a Kubernetes headless
    #: Service gives one A/AAAA record per vLLM pod): each address is a backend of its own,
    #: ``<name>-<address>``, with its own lease and ``max_concurrency``, re-resolved every
    #: ``discover_interval_s``; a replica that disappears drains and releases its lease.
    discover: Literal["none", "dns"] = "none"
    discover_interval_s: float = Field(default=10.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value, "http://127.0.0.1:8001/v1").rstrip("/")

    @model_validator(mode="after")
    def _limit_bounds(self) -> BackendSettings:
        check_limits(self.min_concurrency, self.start_concurrency, self.max_concurrency)
        return self

    @field_validator("metrics_url")
    @classmethod
    def _http_metrics_url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value, "http://127.0.0.1:8000/metrics")

    def api_key(self) -> str | None:
        """Read the key at call time so it lives only in the process environment."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"backends.{self.name}.api_key_env: environment variable "
                f"{self.api_key_env} is not set"
            )
        return key
