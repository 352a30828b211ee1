"""One backend as the worker drives it: its HTTP client, its lease holder, its handler.

The handler is where a delivery walks forward: parsed once, admitted in the policy's
order by the pool's admission, then dispatched on whichever backend of the pool the
admission granted a permit of (or set aside: handed back, or moved to its lane).
"""

from __future__ import annotations

from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage

from pipeline.backends.http import Backend
from pipeline.dispatch.dispatcher import Dispatcher
from pipeline.worker.admission import Verdict
from pipeline.worker.consumer import Handler
from pipeline.worker.lease import LeaseHolder

__all__ = ["Slot"]


@dataclass(frozen=True)
class Slot:
    """One backend as the worker drives it: its HTTP client and its lease holder."""

    http: Backend
    holder: LeaseHolder

    def handler(self, dispatcher: Dispatcher, pool: dict[str, Slot]) -> Handler:
        """Deliveries of the pool's queue (and lanes) consumed for this backend: parsed
        once, admitted in the policy's order by the pool's admission, and dispatched to
        whichever backend of the pool (``pool``, by name) it grants a permit of."""
        admission = self.holder.intake.admission

        async def handle(message: AbstractIncomingMessage) -> None:
            delivery = dispatcher.parse(message, self.http.name)
            grant = await admission.acquire(delivery)
            if grant.verdict is Verdict.MOVE and delivery.deadline_passed():
                # Out of time already: answered now (refused or deadline_exceeded, never a
                # backend call), not moved to expire in a lane with a vaguer answer.
                await dispatcher.handle(delivery, self.http, self.holder.health)
                return
            if grant.verdict is not Verdict.START or grant.backend is None:
                await dispatcher.set_aside(delivery, move=grant.verdict is Verdict.MOVE)
                return
            slot = pool[grant.backend]
            delivery.backend = grant.backend
            try:
                await dispatcher.handle(delivery, slot.http, slot.holder.health)
            finally:
                admission.release(grant.backend)
        return handle
