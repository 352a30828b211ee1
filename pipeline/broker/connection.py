"""The one way Hutch opens an AMQP connection.

Every process (worker, client, CLI commands, benchmarks) connects through :func:`connect`,
so they all get the same things: TLS from the settings (``tls_ca_file``, and
``tls_cert_file``/``tls_key_file`` for mutual TLS), a connection name the management UI
shows, and the broker's refusals turned into errors of :mod:`pipeline.errors` that say what
to do -- an unreachable broker (:class:`BrokerUnreachableError`, the one a retrying caller
retries), refused credentials, a vhost that does not exist or the user may not use, a TLS
certificate failure. :class:`Reconnect` gives retrying callers backoff and one
rate-limited log line instead of a line per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from pipeline.broker.tls import pem_context
from pipeline.broker.tls_probe import speaks_tls
from pipeline.errors import (
    BrokerAccessError,
    BrokerAuthError,
    BrokerConnectionError,
    BrokerTLSError,
    BrokerUnreachableError,
)
from pipeline.observe.log import get_logger
from pipeline.settings import Settings
from pipeline.settings_text import redact_url

__all__ = [
    "CLIENT_CERT_HINT",
    "START_HINT",
    "BrokerIdentity",
    "Reconnect",
    "broker_identity",
    "connect",
    "connect_any",
    "connect_url",
    "connect_urls",
    "explain",
    "tls_context",
    "tls_failure",
    "tls_problem",
]

log = get_logger("hutch.broker")

#: How to get a broker, for the "unreachable" message.
START_HINT = (
    "Is RabbitMQ running? Start it with `rabbitmq-server -detached` or `docker compose up "
    "-d rabbitmq` (the compose broker's user is hutch: "
    "HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/)."
)


class _DropTransportErrors(logging.Filter):
    """aiormq logs every failed connect attempt itself; Hutch reports it once, its way."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_DropTransportErrors())


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of every connection Hutch makes (AMQP and the management API), or
    None when no ``tls_*`` setting is given (the system's trust store, no client
    certificate). Raises :class:`ConfigError` naming a bad key."""
    return pem_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file,
                       keys=("tls_ca_file", "tls_cert_file", "tls_key_file"))


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error behind ``exc`` (aiormq wraps it, asyncio chains it), if any."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        nested = [a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)]
        seen = nested[0] if nested else (seen.__cause__ or seen.__context__)
    return None


#: What a refused or missing client certificate means (AMQP and the management API alike).
CLIENT_CERT_HINT = ("the server wants a client certificate it trusts: set tls_cert_file and "
                    "tls_key_file (a certificate signed by a CA the server trusts)")
#: OpenSSL's verify codes for a certificate that is valid, but not for the name connected to.
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def tls_problem(exc: ssl.SSLError) -> str:
    """What a TLS failure means, for an AMQP or management API error message."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _NAME_MISMATCH:
            return (f"the server's certificate does not name the host in the URL "
                    f"({exc.verify_message}): connect by a name the certificate lists (its "
                    "subjectAltName), or have it re-issued for this name; tls_ca_file "
                    "cannot change that")
        return (f"the server's certificate is not trusted ({exc.verify_message}). A "
                "certificate problem: set tls_ca_file to the CA that signed it")
    if "CERTIFICATE_REQUIRED" in str(exc.reason):
        return CLIENT_CERT_HINT
    return (f"{exc.reason or exc}. A TLS or certificate problem: is it a TLS port (amqps "
            "is usually 5671, the https management API 15671)? Does the server want a "
            "client certificate (tls_cert_file, tls_key_file) signed by a CA it trusts?")


def explain(exc: BaseException, url: str) -> BrokerConnectionError:
    """The :mod:`pipeline.errors` error for a failed connect to ``url``."""
    where = redact_url(url)
    tls = tls_failure(exc)
    if tls is not None:
        return BrokerTLSError(f"TLS handshake with RabbitMQ at {where} failed: "
                              f"{tls_problem(tls)}")
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.
                  AuthenticationError):
        return BrokerAuthError(
            f"RabbitMQ at {where} refused the credentials ({exc.args[0] if exc.args else exc})"
            ": check the user and password in amqp_url")
    # The broker answers Connection.Open on a missing or forbidden vhost with a close (530
    # NOT_ALLOWED), which aiormq reports as an unexpected frame without the reply text.
    if "Connection.Close" in str(exc) or isinstance(exc, aiormq.exceptions.ConnectionNotAllowed):
        parts = urlsplit(url)
        return BrokerAccessError(
            f"RabbitMQ at {where} refused vhost {_vhost(url)!r} to user "
            f"{unquote(parts.username or 'guest')!r}: the vhost does not exist or the user "
            "has no permissions on it (rabbitmqctl add_vhost / set_permissions, or fix the "
            "vhost in amqp_url)")
    hint = START_HINT
    if urlsplit(url).scheme == "amqps" and "reset" in str(exc).lower():
        # TLS 1.3: a refused client certificate shows as a reset after the handshake. It
        # stays retryable (a restarting broker resets too), but the hint says what is likely.
        hint = (f"The broker reset the TLS connection after the handshake: if that "
                f"persists, {CLIENT_CERT_HINT}.")
    return BrokerUnreachableError(f"cannot connect to RabbitMQ at {where} ({exc!r}). {hint}")


async def connect_url(url: str, *, name: str, tls: ssl.SSLContext | None = None,
                      heartbeat_s: int | None = None, timeout_s: float = 10
                      ) -> AbstractConnection:
    """Open a connection to ``url`` named ``name``; failures come from :func:`explain`."""
    context = tls if urlsplit(url).scheme == "amqps" else None
    try:
        # (aio-pika drops a None heartbeat: the broker's proposal is used.)
        return await aio_pika.connect(url, timeout=timeout_s, ssl_context=context,
                                      client_properties={"connection_name": name},
                                      heartbeat=heartbeat_s)
    except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
        error = explain(exc, url)
    parts = urlsplit(url)
    if (isinstance(error, BrokerUnreachableError) and parts.scheme == "amqp"
            and parts.hostname and await speaks_tls(parts.hostname, parts.port or 5672)):
        # Not a broker that is down (retrying would not help): a TLS listener.
        raise BrokerTLSError(
            f"RabbitMQ at {redact_url(url)} speaks TLS on that port: use amqps:// (and "
            "tls_ca_file, tls_cert_file, tls_key_file as the broker needs), or the plain "
            "AMQP port (5672 by default)") from None
    raise error from None


async def connect(settings: Settings, *, name: str, heartbeat_s: int | None = None,
                  timeout_s: float = 10, start: int = 0) -> AbstractConnection:
    """Open an AMQP connection to the first reachable node of ``settings.amqp_nodes()``
    (``amqp_url``, then ``amqp_urls``; from index ``start`` on, wrapping around), with the
    settings' TLS.

    ``name`` is the client-provided connection name the management UI shows (say which
    process it is: ``hutch-worker host:pid``). Raises a
    :class:`~pipeline.errors.BrokerConnectionError`: only :class:`BrokerUnreachableError`
    (no node answered) is worth retrying. A node that answers and refuses (credentials,
    vhost, TLS) does not stop the search: its error is raised only if no other node lets
    the connection in.
    """
    connection, _ = await connect_any(settings, name=name, heartbeat_s=heartbeat_s,
                                      timeout_s=timeout_s, start=start)
    return connection


async def connect_any(settings: Settings, *, name: str, heartbeat_s: int | None = None,
                      timeout_s: float = 10, start: int = 0
                      ) -> tuple[AbstractConnection, int]:
    """:func:`connect`, and the index of the node it reached in ``settings.amqp_nodes()``."""
    return await connect_urls(settings.amqp_nodes(), name=name, tls=tls_context(settings),
                              heartbeat_s=heartbeat_s, timeout_s=timeout_s, start=start)


async def connect_urls(urls: Sequence[str], *, name: str, tls: ssl.SSLContext | None = None,
                       heartbeat_s: int | None = None, timeout_s: float = 10, start: int = 0
                       ) -> tuple[AbstractConnection, int]:
    """A connection to the first of ``urls`` (the nodes of one cluster, from index
    ``start`` on, wrapping around) that lets it in, and that node's index; a move past a
    failed node is logged (``amqp.failover``, naming the node reached)."""
    failures: list[BrokerConnectionError] = []
    for step in range(len(urls)):
        index = (start + step) % len(urls)
        try:
            connection = await connect_url(urls[index], name=name, tls=tls,
                                           heartbeat_s=heartbeat_s, timeout_s=timeout_s)
        except BrokerConnectionError as exc:
            failures.append(exc)
            continue
        if failures:
            log.warning("amqp.failover", node=redact_url(urls[index]), connection=name,
                        skipped=len(failures), error=str(failures[-1]))
        return connection, index
    refusals = [f for f in failures if not isinstance(f, BrokerUnreachableError)]
    if refusals or len(failures) == 1:
        raise (refusals or failures)[0]
    raise BrokerUnreachableError(
        f"cannot connect to any of the {len(urls)} RabbitMQ nodes: "
        + "; ".join(str(f).split(". ", 1)[0] for f in failures) + f". {START_HINT}")


@dataclass(frozen=True)
class BrokerIdentity:
    """Which broker a connection reached, from its server properties."""

    cluster_name: str | None
    product: str | None
    version: str | None


def broker_identity(connection: AbstractConnection) -> BrokerIdentity:
    """The cluster name and version the broker announced when ``connection`` opened."""
    underlay = getattr(connection, "transport", None)
    props = getattr(getattr(underlay, "connection", None), "server_properties", None) or {}

    def text(key: str) -> str | None:
        value = props.get(key)
        if isinstance(value, bytes):
            return value.decode()
        return None if value is None else str(value)

    return BrokerIdentity(text("cluster_name"), text("product"), text("version"))


class Reconnect:
    """Backoff, node rotation and a rate-limited log for a caller that keeps connecting
    (the worker).

    Each connect starts at the node after the one the previous connection reached: a
    connection is lost mostly because its node died, so the next one goes elsewhere (with
    one node, to the same one). A cluster that stays down gives one ``amqp.unreachable``
    line at the first failure and then at most one every ``log_every_s`` (with the number
    of attempts since), not one per attempt; ``amqp.connected`` names the node reached
    after a failure or a move. Errors other than :class:`BrokerUnreachableError` are not
    retried: they are raised.
    """

    def __init__(self, settings: Settings, *, name: str, heartbeat_s: int | None = None,
                 first_delay_s: float = 0.5, max_delay_s: float = 5.0,
                 log_every_s: float = 30.0) -> None:
        self._settings = settings
        self._name = name
        self._heartbeat_s = heartbeat_s
        self._first = first_delay_s
        self._max = max_delay_s
        self._log_every_s = log_every_s
        self.delay_s = first_delay_s
        self.attempts = 0
        self._logged_at: float | None = None
        #: Index (in ``settings.amqp_nodes()``) of the node last reached, None before.
        self.node: int | None = None

    @property
    def node_url(self) -> str | None:
        """The node last reached (redacted), for logs and tests."""
        return None if self.node is None else redact_url(self._settings.amqp_nodes()[self.node])

    async def connect(self, stop: asyncio.Event) -> AbstractConnection | None:
        """Connect, retrying with backoff until it works or ``stop`` is set (then None)."""
        start = 0 if self.node is None else self.node + 1
        while not stop.is_set():
            try:
                connection, index = await connect_any(
                    self._settings, name=self._name, heartbeat_s=self._heartbeat_s, start=start)
            except BrokerUnreachableError as exc:
                self._failed(exc)
                try:
                    await asyncio.wait_for(stop.wait(), self.delay_s)
                except TimeoutError:
                    pass
                self.delay_s = min(self.delay_s * 2, self._max)
                continue
            moved = self.node is not None and index != self.node
            self.node = index
            if self.attempts or moved:
                log.info("amqp.connected", node=self.node_url, failed_attempts=self.attempts)
            self.attempts, self.delay_s, self._logged_at = 0, self._first, None
            return connection
        return None

    def _failed(self, exc: BrokerUnreachableError) -> None:
        self.attempts += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self._log_every_s:
            self._logged_at = now
            nodes = [redact_url(url) for url in self._settings.amqp_nodes()]
            log.warning("amqp.unreachable", url=nodes[0] if len(nodes) == 1 else nodes,
                        error=repr(exc.__context__ or exc),
                        attempts=self.attempts, retry_in_s=self.delay_s,
                        next_log_in_s=self._log_every_s)
