"""Does a port speak TLS? For the error of a plain connection to a TLS listener.

``amqp://`` to RabbitMQ's TLS port (5671) or ``http://`` to its https management port
fails as a reset or as garbage, which reads like a broker that is down. A second, TLS,
attempt tells them apart: a server that answers a TLS handshake (even with an alert, such
as "certificate required") speaks TLS there, and the fix is ``amqps://`` or ``https://``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

__all__ = ["speaks_tls"]


async def speaks_tls(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """True if ``host:port`` completes a TLS handshake or answers it with a TLS alert."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol matters here, not the peer
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
        return True
    except ssl.SSLError as exc:
        # An alert is TLS speaking; "wrong version number" is a plain-text reply.
        return "ALERT" in str(exc.reason or "").upper()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
