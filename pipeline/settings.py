"""One typed settings model for every Hutch process.

Settings come from one TOML file; environment variables (``HUTCH_AMQP_URL``,
``HUTCH_MAX_PRIORITY``, ...; ``HUTCH_POOLS`` as a JSON list) override it, and values a
program passes to :func:`load_settings` override both. Everything is validated
once, at start, and an invalid value is reported as a :class:`~pipeline.errors.ConfigError`
that names the bad key (``pools.0.backends.1.max_concurrency: ...``), never a traceback.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.errors import ConfigError
from pipeline.gateway.settings import GatewaySettings
from pipeline.scheduling.settings import (
    QUORUM_LANES,
    PoolScheduling,
    TenantSettings,
    check_tenants,
)
from pipeline.settings_backend import _NAME, CONSUMER_TIMEOUT_S, BackendSettings, _Strict
from pipeline.settings_checks import check_amqp_url, check_names
from pipeline.settings_env import HutchEnvSource, read_config_file
from pipeline.settings_text import dump_toml, environment_keys, format_errors, redact_url

__all__ = [
    "DEFAULT_AMQP_URL",
    "BackendSettings",
    "PoolSettings",
    "QueueType",
    "Settings",
    "dump_toml",
    "load_settings",
]

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: ``classic``: one node holds the queue (unusable while that node is down, nothing lost);
#: ``quorum``: replicated over the cluster's nodes (survives the loss of a minority).
QueueType = Literal["classic", "quorum"]


class PoolSettings(_Strict):
    """Backends that serve the same models share one work queue: a pool."""

    name: str = Field(pattern=_NAME)
    models: list[str] = Field(min_length=1)
    max_queue_length: int = Field(default=10_000, ge=1)
    #: Optional cap on how long any request may wait in this pool's queue (policy TTL).
    message_ttl_ms: int | None = Field(default=None, ge=1)
    #: Backend attempts per request in all, counted in the x-hutch-attempts header.
    max_attempts: int = Field(default=5, ge=1, le=50)
    #: Attempts made in-process (tenacity) on the slot a delivery holds, before the
    #: request goes to a delayed retry tier and frees the slot.
    attempts_per_delivery: int = Field(default=2, ge=1, le=20)
    #: Delays of the retry tiers: the n-th trip through a tier waits retry_delays_ms[n]
    #: (the last one repeats). Each delay is a queue with that fixed x-message-ttl.
    retry_delays_ms: list[int] = Field(default_factory=lambda: [1000, 5000, 30000],
                                       max_length=10)
    #: Circuit breaker: consecutive failures that take a backend out, and for how long.
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    breaker_cooldown_s: float = Field(default=10.0, gt=0, le=3600)
    #: ``quorum``: the pool's work queue (and the queues every pool shares: retry tiers,
    #: triage, parking lot, presence) are replicated quorum queues; see the docs, page
    #: "Cluster" (docs/cluster.md). Changing it later is a migration, never done by apply.
    queue_type: QueueType = "classic"
    #: Quorum pools: returns (a nack with requeue on a 429, a pause or an open circuit, a
    #: lost consumer) after which the broker dead-letters a request. Every return counts,
    #: so it is high: a request handed back once per throttled probe must not exhaust it.
    delivery_limit: int = Field(default=1000, ge=1, le=1_000_000)
    backends: list[BackendSettings] = Field(min_length=1)
    #: Who goes next at each backend: bands, tenants' fair share, lookahead, lanes.
    scheduling: PoolScheduling = Field(default_factory=PoolScheduling)

    @model_validator(mode="after")
    def _attempts_fit_consumer_timeout(self) -> PoolSettings:
        # A delivery unacked for consumer_timeout closes its channel: all attempts of one
        # request (each up to timeout_s) must fit well inside it.
        for j, backend in enumerate(self.backends):
            worst = backend.timeout_s * self.attempts_per_delivery
            if worst > CONSUMER_TIMEOUT_S * 0.9:
                raise ValueError(
                    f"backends.{j}.timeout_s: {backend.timeout_s:g}s x attempts_per_delivery "
                    f"{self.attempts_per_delivery} = {worst:g}s comes too close to RabbitMQ's "
                    f"consumer_timeout ({CONSUMER_TIMEOUT_S}s); lower one of them")
        return self

    @model_validator(mode="after")
    def _quorum_lanes(self) -> PoolSettings:
        # Each quorum lane is a Raft group on every node: fewer of them unless asked for.
        if self.queue_type == "quorum" and "lanes" not in self.scheduling.model_fields_set:
            object.__setattr__(self, "scheduling",
                               self.scheduling.model_copy(update={"lanes": QUORUM_LANES}))
        return self

    @field_validator("retry_delays_ms")
    @classmethod
    def _delays(cls, value: list[int]) -> list[int]:
        for delay in value:
            if not 10 <= delay <= 24 * 3600 * 1000:
                raise ValueError(f"retry delay {delay} ms must be within 10 ms .. 24 h")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        for model in value:
            if not model or len(model) > 255:
                raise ValueError(f"model name {model!r} must be 1..255 characters")
        if len(set(value)) != len(value):
            raise ValueError("model names must be unique")
        return value


#: The TOML file's contents while load_settings builds a Settings (lowest-priority source).
_FILE_DATA: ContextVar[dict[str, Any]] = ContextVar("hutch_file_data", default={})  # noqa: B039


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _FILE_DATA.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get())


class Settings(BaseSettings):
    """Everything a Hutch worker, client tool or topology command needs."""

    model_config = SettingsConfigDict(
        env_prefix="HUTCH_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    amqp_url: str = DEFAULT_AMQP_URL
    #: Every node of a cluster (``amqp_url`` is tried first, then these in order); a list
    #: given as ``amqp_url`` lands here too. Same user and vhost on every node.
    amqp_urls: list[str] = Field(default_factory=list)
    #: Management HTTP API; default: the AMQP host on port 15672, same credentials and vhost.
    management_url: str | None = None
    #: TLS for every connection (amqps://, https:// management API): a PEM CA bundle trusted
    #: instead of the system's; for mutual TLS a client certificate and its key.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: Prefix of every exchange and queue name (``llm.requests``, ``llm.work.<pool>``, ...).
    prefix: str = Field(default="llm", pattern=_NAME)
    max_priority: int = Field(default=9, ge=1, le=255)
    #: AMQP heartbeat: how fast a silent network loss is noticed (and a lease freed).
    heartbeat_s: int = Field(default=5, ge=1, le=600)
    #: How often a worker that does not hold a backend's lease tries to take it.
    lease_retry_s: float = Field(default=1.0, gt=0, le=60)
    #: SIGTERM: how long in-flight requests may take before the worker exits anyway.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    #: Requests larger than this are refused with ``invalid_request``.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    #: Reply queues vanish after this long without a consumer.
    reply_queue_expires_s: int = Field(default=3600, ge=10)
    #: ``quorum``: clients' durable reply queues are replicated, so replies survive the
    #: loss of a node (with the same expiry); ``classic``: one node holds them.
    reply_queue_type: QueueType = "classic"
    #: Prefetch of the dead-letter triage consumer (no backend behind it).
    triage_prefetch: int = Field(default=32, ge=1, le=10_000)
    #: Refuse (park as ``no_user_id``, answer nothing) requests that carry no ``user_id``.
    #: Off by default for single-user setups; turn it on with per-client users.
    require_user_id: bool = False
    #: Users, besides the worker's own (``amqp_url``'s), trusted to publish on a client's
    #: behalf (``x-hutch-user``) and to reply anywhere: e.g. an operator replaying parked
    #: requests. Everyone else may only name their own reply queues in ``reply_to``.
    trusted_users: list[str] = Field(default_factory=list)
    #: Streaming: the first chunk goes out at once; later chunk messages at most every
    #: ``stream_window_ms``, or as soon as ``stream_max_chunks`` chunks wait.
    stream_window_ms: int = Field(default=25, ge=0, le=10_000)
    stream_max_chunks: int = Field(default=64, ge=1, le=100_000)
    #: After a stream's first chunk, the longest gap between two chunks.
    stream_idle_timeout_s: float = Field(default=30.0, gt=0, lt=CONSUMER_TIMEOUT_S)
    #: Cancelled request ids are remembered this long, at most ``cancel_max_ids`` of them.
    cancel_ttl_s: float = Field(default=600.0, gt=0, le=86_400)
    cancel_max_ids: int = Field(default=100_000, ge=100, le=10_000_000)
    pools: list[PoolSettings] = Field(default_factory=list)
    #: Tenants the configuration says something about (weights, ceilings, quotas, teams);
    #: every other user is a tenant of its own, served fairly all the same.
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    #: ``hutch gateway``, the OpenAI-compatible HTTP front door (pipeline/gateway).
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments beat the environment, which beats the file.
        return init_settings, HutchEnvSource(settings_cls), _FileSource(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _url_list(cls, data: Any) -> Any:
        # ``amqp_url = [a, b, c]`` means the cluster a, b, c, tried in that order.
        if isinstance(data, dict):
            urls, listed = data.get("amqp_url"), data.get("amqp_urls")
            if isinstance(urls, list) and urls:
                extra = listed if isinstance(listed, list) else []
                data = {**data, "amqp_url": urls[0], "amqp_urls": [*urls[1:], *extra]}
            elif urls is None and isinstance(listed, list) and listed:
                data = {**data, "amqp_url": listed[0]}
        return data

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        return check_amqp_url(value)

    @field_validator("amqp_urls")
    @classmethod
    def _amqp_urls(cls, value: list[str]) -> list[str]:
        return [check_amqp_url(url) for url in value]

    @field_validator("management_url")
    @classmethod
    def _management_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:15672")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _one_cluster(self) -> Settings:
        # Users, vhosts and permissions are cluster-wide: every node is reached as one
        # user in one vhost, or a failover would silently change who publishes where.
        first = urlsplit(self.amqp_url)
        for url in self.amqp_urls:
            parts = urlsplit(url)
            if (parts.username, parts.path.strip("/")) != (first.username,
                                                          first.path.strip("/")):
                raise ValueError("amqp_urls: every node's URL must name the same user and "
                                 f"vhost as amqp_url ({redact_url(url)} does not)")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        check_names(self.pools)
        check_tenants(self.tenants)
        return self

    # -- derived values -------------------------------------------------------------

    @property
    def vhost(self) -> str:
        """The AMQP URL's vhost ("/" when the path is empty)."""
        path = urlsplit(self.amqp_url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    @property
    def amqp_user(self) -> str:
        """The user ``amqp_url`` connects as (the ``user_id`` the broker accepts from it)."""
        return unquote(urlsplit(self.amqp_url).username or "guest")

    def management_api(self) -> tuple[str, str, str]:
        """(base URL, user, password) of the management HTTP API."""
        parts = urlsplit(self.amqp_url)
        user = unquote(parts.username or "guest")
        password = unquote(parts.password or "guest")
        if self.management_url:
            mparts = urlsplit(self.management_url)
            if mparts.username:
                user = unquote(mparts.username)
                password = unquote(mparts.password or "")
            netloc = mparts.hostname or ""
            if mparts.port:
                netloc = f"{netloc}:{mparts.port}"
            return f"{mparts.scheme}://{netloc}{mparts.path}".rstrip("/"), user, password
        if parts.scheme == "amqps":  # RabbitMQ's TLS management listener
            return f"https://{parts.hostname}:15671", user, password
        return f"http://{parts.hostname}:15672", user, password

    def pool(self, name: str) -> PoolSettings:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    def amqp_nodes(self) -> list[str]:
        """Every node's URL, in the order they are tried: ``amqp_url`` first."""
        return list(dict.fromkeys([self.amqp_url, *self.amqp_urls]))

    def with_vhost(self, vhost: str) -> Settings:
        """A copy pointing at another vhost (tests isolate themselves this way)."""
        path = "/" + quote(vhost, safe="")
        url, *others = [urlsplit(u)._replace(path=path).geturl() for u in self.amqp_nodes()]
        return self.model_copy(update={"amqp_url": url, "amqp_urls": others})

    def redacted_amqp_url(self) -> str:
        """The AMQP URL without its password, for logs and messages."""
        return redact_url(self.amqp_url)

    def quorum(self) -> bool:
        """Whether any pool is a quorum pool (the shared queues are quorum then too)."""
        return any(pool.queue_type == "quorum" for pool in self.pools)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (TOML), apply ``HUTCH_*`` environment overrides, validate.

    ``overrides`` win over both the environment and the file; tests and the demo use them
    to build settings without a file. Raises :class:`ConfigError` with one line per
    bad key.
    """
    data = read_config_file(path) if path is not None else {}
    source = "defaults and environment" if path is None else str(path)
    token = _FILE_DATA.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        environment = environment_keys(str(Settings.model_config.get("env_prefix", "")),
                                       Settings.model_fields, overrides)
        raise ConfigError(format_errors(exc, source, environment)) from None
    finally:
        _FILE_DATA.reset(token)
