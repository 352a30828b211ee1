"""Who a request's tenant is, what the configuration says of it, and its quota use.

The tenant is derived from the client the broker validated (:attr:`Delivery.client`: the
``user_id``, or the identity a trusted publisher such as the gateway vouches for); a user
listed under ``[tenants.<name>] users`` belongs to that tenant, any other user is a tenant
of its own, and a request without an identity belongs to :data:`DEFAULT_TENANT`. Nothing a
client writes in a header can change its tenant.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from pipeline.scheduling.settings import DEFAULT_TENANT, TenantSettings

__all__ = ["QuotaMeter", "TenantBook"]

_UNCONFIGURED = TenantSettings()
#: The quota window: tokens per minute.
_WINDOW_S = 60.0


class TenantBook:
    """The configured tenants, looked up by user."""

    def __init__(self, tenants: dict[str, TenantSettings]) -> None:
        self._tenants = dict(tenants)
        self._owner = {user: name for name, t in tenants.items() for user in t.users}

    def tenant_of(self, client: str | None) -> str:
        if not client:
            return DEFAULT_TENANT
        return self._owner.get(client, client)

    def settings(self, tenant: str) -> TenantSettings:
        return self._tenants.get(tenant, _UNCONFIGURED)

    def served_priority(self, tenant: str, priority: int) -> int:
        """``priority`` lowered to the tenant's ceiling, if it has one."""
        ceiling = self.settings(tenant).max_priority
        return priority if ceiling is None else min(priority, ceiling)


class QuotaMeter:
    """Tokens served per tenant over the last minute, for tenants that have a quota."""

    def __init__(self, book: TenantBook, clock: Callable[[], float] = time.monotonic) -> None:
        self._book = book
        self._clock = clock
        self._served: dict[str, deque[tuple[float, int]]] = {}
        self._totals: dict[str, int] = {}

    def record(self, tenant: str, tokens: int) -> None:
        if self._book.settings(tenant).tokens_per_minute is None or tokens <= 0:
            return
        self._served.setdefault(tenant, deque()).append((self._clock(), tokens))
        self._totals[tenant] = self._totals.get(tenant, 0) + tokens

    def used(self, tenant: str) -> int:
        """Tokens served to ``tenant`` in the last minute."""
        served = self._served.get(tenant)
        if served is None:
            return 0
        horizon = self._clock() - _WINDOW_S
        while served and served[0][0] < horizon:
            self._totals[tenant] -= served.popleft()[1]
        if not served:
            del self._served[tenant], self._totals[tenant]
            return 0
        return self._totals[tenant]

    def over(self, tenant: str) -> bool:
        """Whether ``tenant`` has used its quota (a quota of 0: always)."""
        quota = self._book.settings(tenant).tokens_per_minute
        return quota is not None and self.used(tenant) >= quota
