"""The reply guard: who published a request, and whether its ``reply_to`` is theirs.

The broker validates ``user_id`` (a publisher can only set its own user), so it names the
client. A client user ``U`` owns the reply queues ``<prefix>.reply.U`` and
``<prefix>.reply.U.<suffix>`` (the queues its permissions let it declare and read, see
topology.clients); a request naming any other queue is refused unanswered, so a client
cannot make the worker write into someone else's queue (or into a work queue).

A worker republishes requests (retry tiers) as itself: it sets ``user_id`` to its own user
and carries the client in ``x-hutch-user``, which is believed only when ``user_id`` is the
worker's user or a trusted one. Those users' own requests are not checked (a single-user
setup, guest everywhere, keeps working).

The guard runs once per delivery, when :class:`pipeline.delivery.Delivery` is parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.outcome import Failure
from pipeline.settings import Settings

__all__ = ["ReplyGuard"]



@dataclass(frozen=True)
class ReplyGuard:
    """The reply rules of one worker (a :class:`pipeline.delivery.ReplyPolicy`)."""

    names: Names
    #: The user the worker publishes as: the ``user_id`` it sets on retries. None: unknown
    #: (retries then carry no identity).
    worker_user: str | None = None
    trusted_users: frozenset[str] = frozenset()
    require_user_id: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplyGuard:
        return cls(Names(settings.prefix), settings.amqp_user,
                   frozenset(settings.trusted_users), settings.require_user_id)

    def _trusted(self, user: str) -> bool:
        return user == self.worker_user or user in self.trusted_users

    def vouches(self, user_id: str | None) -> bool:
        """Whether a message published as ``user_id`` is one a worker (or a trusted user)
        wrote: its ``x-hutch-*`` routing facts may be believed."""
        return bool(user_id) and self._trusted(user_id or "")

    def client_user(self, user_id: str | None, headers: Mapping[str, Any]) -> str | None:
        """The client a request comes from (validated by the broker), or None."""
        if not user_id:
            return None
        if self._trusted(user_id):
            on_behalf = p.text_header(headers.get(p.H_USER))
            if on_behalf:
                return on_behalf
        return user_id

    def owns(self, user: str, reply_to: str) -> bool:
        """True if ``reply_to`` is one of ``user``'s reply queues."""
        own = self.names.reply_queue(user)
        return reply_to == own or (reply_to.startswith(own + ".") and len(reply_to) > len(own) + 1)

    def refusal(self, user: str | None, reply_to: str | None,
                publisher: str | None = None) -> Failure | None:
        """Why the worker must not answer ``reply_to`` for client ``user``, or None.
        ``publisher`` is the message's own ``user_id``: a trusted publisher acting for a
        client (the HTTP gateway) may also name one of its own reply queues."""
        code = p.ErrorCode.INVALID_REQUEST
        if (publisher is not None and reply_to is not None and self._trusted(publisher)
                and self.owns(publisher, reply_to)):
            return None
        if user is None:
            if self.require_user_id:
                return Failure(p.ParkReason.NO_USER_ID, code,
                               "the request carries no user_id, which this worker requires "
                               "(it proves which client's reply queue may be answered); "
                               "nothing was sent to its reply_to")
            return None
        if self._trusted(user) or reply_to is None:
            return None  # no reply_to at all is refused by validation as no_reply_to
        if self.owns(user, reply_to):
            return None
        own = self.names.reply_queue(user)
        return Failure(p.ParkReason.FORGED_REPLY_TO, code,
                       f"reply_to {reply_to!r} is not a reply queue of user {user!r} (those "
                       f"are {own!r} and {own!r}.<suffix>); nothing was sent to it")

    def valid_reply_to(self, reply_to: str | None) -> bool:
        """Replies go only to reply queues: never into a work queue or the parking lot,
        where a forged ``reply_to`` would make the worker feed itself."""
        prefix = self.names.reply_queue("")
        return reply_to is not None and reply_to.startswith(prefix) and len(reply_to) > len(
            prefix)
