"""A small client for the RabbitMQ management HTTP API.

Policies (dead-lettering, queue limits, TTLs) can only be set over this API or
``rabbitmqctl``; Hutch uses the API so the same code works against a remote broker.
Every failure becomes a :class:`~pipeline.errors.TopologyError` that says what to do.

The API's address is configured apart from the AMQP URL, so it can name another broker
(a second local broker without the plugin: its queues here, its policies there). Built with
:meth:`ManagementAPI.from_settings`, the client checks before its first write that the API
answers for the broker the AMQP connection reaches (the cluster name the broker announces
on AMQP against the API's ``/api/overview``) and refuses otherwise.
"""

from __future__ import annotations

import ssl
from typing import Any, Self
from urllib.parse import quote, urlsplit

import httpx
from aio_pika.abc import AbstractConnection

from pipeline.broker.connection import (
    BrokerIdentity,
    broker_identity,
    connect,
    tls_context,
    tls_failure,
    tls_problem,
)
from pipeline.broker.tls_probe import speaks_tls
from pipeline.errors import TopologyError
from pipeline.settings import Settings

__all__ = ["TIMEOUT_S", "ManagementAPI"]

#: How long one request to the management API may take. Generous: on a busy broker a
#: policy put on a vhost with thousands of queues takes seconds (10 s once ran out in CI).
TIMEOUT_S = 30.0

_ENABLE_HINT = (
    "is the management plugin enabled? run: rabbitmq-plugins enable rabbitmq_management "
    "(or set management_url in the config)"
)


def _q(value: str) -> str:
    return quote(value, safe="")


class ManagementAPI:
    """Async access to ``/api`` of one broker, as one user."""

    def __init__(self, base_url: str, user: str, password: str, *,
                 timeout_s: float = TIMEOUT_S,
                 tls: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._user = user
        self._timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            base_url=self.base_url + "/api", auth=(user, password), timeout=timeout_s,
            verify=tls if tls is not None else True)
        #: Before the first write: the settings whose AMQP broker the API must belong to,
        #: and that broker's identity once known.
        self._same_broker_as: Settings | None = None
        self._amqp_identity: BrokerIdentity | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, connection: AbstractConnection | None = None,
                      timeout_s: float = TIMEOUT_S) -> Self:
        """The API of ``settings`` (its address, credentials and TLS), which refuses to
        write unless it belongs to the broker of ``settings.amqp_url``: the one
        ``connection`` reached, or (without one) a short connection of its own."""
        base, user, password = settings.management_api()
        api = cls(base, user, password, timeout_s=timeout_s, tls=tls_context(settings))
        api._same_broker_as = settings
        if connection is not None:
            api._amqp_identity = broker_identity(connection)
        return api

    async def _check_same_broker(self) -> None:
        settings, self._same_broker_as = self._same_broker_as, None
        if settings is None:
            return
        amqp = self._amqp_identity
        if amqp is None:
            connection = await connect(settings, name="hutch management-api check")
            async with connection:
                amqp = broker_identity(connection)
        overview = await self._request("GET", "/overview")
        api_cluster = overview.get("cluster_name")
        if amqp.cluster_name and api_cluster and api_cluster != amqp.cluster_name:
            raise TopologyError(
                f"the management API at {self.base_url} belongs to another broker: cluster "
                f"{api_cluster!r} (node {overview.get('node')!r}), while "
                f"{settings.redacted_amqp_url()} reaches cluster {amqp.cluster_name!r}. "
                "Nothing was written. Set management_url (or HUTCH_MANAGEMENT_URL) to the "
                "management API of the broker amqp_url names (and enable its plugin: "
                "rabbitmq-plugins enable rabbitmq_management)")

    async def check_same_broker(self) -> None:
        """Refuse now (:class:`TopologyError`), before anything is started or written,
        when the API belongs to another broker than ``amqp_url``'s; once per client. For
        commands whose reads decide what they write (another broker's listing has nothing
        to delete, and "removed 0" would look like success) and for the benchmarks."""
        await self._check_same_broker()

    async def __aenter__(self) -> ManagementAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, json: Any = None,
                       ok_missing: bool = False) -> Any:
        if method != "GET" and self._same_broker_as is not None:
            await self._check_same_broker()
        try:
            response = await self._http.request(method, path, json=json)
        except (httpx.HTTPError, ssl.SSLError) as exc:  # a TLS 1.3 alert can come bare
            raise await self._unreachable(exc) from None
        if response.status_code == 404 and ok_missing:
            return None
        if response.status_code == 401:
            raise self._refused(response)
        if response.status_code >= 400:
            raise TopologyError(
                f"management API {method} {path} failed with HTTP {response.status_code}: "
                f"{response.text[:300]}"
            )
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    async def _unreachable(self, exc: Exception) -> TopologyError:
        """Why the API could not be asked: TLS, https spoken on an http:// URL, or down."""
        tls = tls_failure(exc)
        if tls is not None:
            return TopologyError(f"management API at {self.base_url}: TLS handshake "
                                 f"failed: {tls_problem(tls)}")
        parts = urlsplit(self.base_url)
        if (parts.scheme == "http" and parts.hostname and parts.port
                and await speaks_tls(parts.hostname, parts.port)):
            return TopologyError(
                f"management API at {self.base_url} speaks https on that port: use https:// "
                "in management_url (or HUTCH_MANAGEMENT_URL)")
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return TopologyError(
                f"management API at {self.base_url} took the request but did not answer "
                f"within {self._timeout_s:g} s ({exc!r}): the broker is busy (a policy on a "
                "vhost with many queues is matched against each of them); try again")
        return TopologyError(
            f"management API at {self.base_url} is not reachable ({exc!r}): {_ENABLE_HINT}")

    def _refused(self, response: httpx.Response) -> TopologyError:
        """A 401: a failed login (user or password) is not a missing tag."""
        try:
            reason = str(response.json().get("reason", ""))
        except (ValueError, AttributeError):
            reason = ""
        who = f"management API at {self.base_url} refused user {self._user!r}"
        if reason == "Login failed":
            return TopologyError(f"{who}: login failed, a wrong user or password (those of "
                                 "management_url if it has any, else amqp_url's)")
        return TopologyError(
            f"{who} ({reason or 'HTTP 401'}): the user logs in but lacks a tag; it needs "
            "'management' to read (hutch status), 'policymaker' or 'administrator' to set "
            "policies (hutch topology apply)")

    async def check(self) -> None:
        """Fail early (before anything is declared) when the API is unreachable."""
        await self._request("GET", "/overview")

    async def overview(self) -> dict[str, Any]:
        """``/api/overview``: the broker's identity and statistics settings (status)."""
        result = await self._request("GET", "/overview")
        return dict(result or {})

    # -- policies ------------------------------------------------------------------

    async def put_policy(self, vhost: str, name: str, *, pattern: str, definition: dict[str, Any],
                         apply_to: str = "queues", priority: int = 0) -> None:
        body = {"pattern": pattern, "definition": definition, "apply-to": apply_to,
                "priority": priority}
        await self._request("PUT", f"/policies/{_q(vhost)}/{_q(name)}", json=body)

    async def get_policy(self, vhost: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._request(
            "GET", f"/policies/{_q(vhost)}/{_q(name)}", ok_missing=True)
        return result

    async def delete_policy(self, vhost: str, name: str) -> None:
        await self._request("DELETE", f"/policies/{_q(vhost)}/{_q(name)}", ok_missing=True)

    # -- queues and bindings -----------------------------------------------------------

    async def get_queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._request(
            "GET", f"/queues/{_q(vhost)}/{_q(name)}", ok_missing=True)
        return result

    async def get_connection(self, name: str) -> dict[str, Any] | None:
        """One connection (``name``: as a queue's ``owner_pid_details`` gives it)."""
        result: dict[str, Any] | None = await self._request(
            "GET", f"/connections/{_q(name)}", ok_missing=True)
        return result

    async def queue_bindings(self, vhost: str, exchange: str, queue: str) -> list[dict[str, Any]]:
        result = await self._request(
            "GET", f"/bindings/{_q(vhost)}/e/{_q(exchange)}/q/{_q(queue)}", ok_missing=True)
        return list(result or [])

    async def list_queues(self, vhost: str) -> list[dict[str, Any]]:
        """Every queue of the vhost: name, arguments, durable, auto_delete, exclusive,
        messages (absent until the broker has stats for a new queue), policy."""
        result = await self._request(
            "GET", f"/queues/{_q(vhost)}?columns=name,arguments,durable,auto_delete,"
                   "exclusive,messages,policy,type")
        return list(result or [])

    async def list_exchanges(self, vhost: str) -> list[dict[str, Any]]:
        """Every exchange of the vhost (the default and ``amq.*`` ones included)."""
        result = await self._request(
            "GET", f"/exchanges/{_q(vhost)}?columns=name,type,durable,auto_delete,internal,"
                   "arguments")
        return list(result or [])

    async def list_bindings(self, vhost: str) -> list[dict[str, Any]]:
        """Every binding of the vhost (the default exchange's implicit ones included:
        their ``source`` is "")."""
        result = await self._request("GET", f"/bindings/{_q(vhost)}")
        return list(result or [])

    async def list_policies(self, vhost: str) -> list[dict[str, Any]]:
        result = await self._request("GET", f"/policies/{_q(vhost)}")
        return list(result or [])

    # -- definitions --------------------------------------------------------------------

    async def get_definitions(self, vhost: str) -> dict[str, Any]:
        """The vhost's definitions, in the format of a definitions file (needs the
        ``administrator`` tag). Objects in this export do not name their vhost."""
        result: dict[str, Any] = await self._request("GET", f"/definitions/{_q(vhost)}")
        return result

    async def import_definitions(self, definitions: dict[str, Any], vhost: str | None = None
                                 ) -> None:
        """Import a definitions file as the UI's "Import definitions" does: into ``vhost``
        (the objects' own ``vhost`` keys are ignored; users and vhosts are not imported),
        or, without ``vhost``, everything as a node does at boot (``administrator`` only)."""
        path = "/definitions" if vhost is None else f"/definitions/{_q(vhost)}"
        await self._request("POST", path, json=definitions)

    # -- vhosts and permissions (tests and `hutch client`) -------------------------------

    async def list_vhosts(self) -> list[dict[str, Any]]:
        """The vhosts this user may use (all of them for an administrator)."""
        return list(await self._request("GET", "/vhosts?columns=name") or [])

    async def get_vhost(self, vhost: str) -> dict[str, Any] | None:
        """One vhost (``administrator`` only), None if it does not exist."""
        result: dict[str, Any] | None = await self._request(
            "GET", f"/vhosts/{_q(vhost)}", ok_missing=True)
        return result

    async def create_vhost(self, vhost: str) -> None:
        await self._request("PUT", f"/vhosts/{_q(vhost)}", json={})

    async def delete_vhost(self, vhost: str) -> None:
        await self._request("DELETE", f"/vhosts/{_q(vhost)}", ok_missing=True)

    async def set_permissions(self, vhost: str, user: str, *, configure: str = ".*",
                              write: str = ".*", read: str = ".*") -> None:
        await self._request("PUT", f"/permissions/{_q(vhost)}/{_q(user)}",
                            json={"configure": configure, "write": write, "read": read})
