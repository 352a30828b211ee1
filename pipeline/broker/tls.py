"""TLS from PEM files: the one place a client-side ``ssl.SSLContext`` is made.

The settings (``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``: every connection of a
worker or a command) and a :class:`~pipeline.client.client.HutchClient` built without
settings (its ``tls=TLSFiles(...)``) both come here, so both check the files the same way
and a bad one is a :class:`ConfigError` naming the key it was given under.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from pipeline.errors import ConfigError

__all__ = ["TLSFiles", "pem_context"]


def _readable(path: str | os.PathLike[str] | None, key: str) -> str | None:
    if path is None:
        return None
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: cannot read {str(path)!r} (a PEM file)")
    return os.fspath(path)


def pem_context(ca_file: str | os.PathLike[str] | None,
                cert_file: str | os.PathLike[str] | None,
                key_file: str | os.PathLike[str] | None, *,
                keys: tuple[str, str, str]) -> ssl.SSLContext | None:
    """A context trusting ``ca_file`` (else the system's store) and presenting
    ``cert_file``/``key_file`` (mutual TLS); None when no file is given. ``keys``: the
    names the three were given under, for the error message."""
    ca, cert, key = (_readable(path, name)
                     for path, name in zip((ca_file, cert_file, key_file), keys, strict=True))
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ConfigError(f"{keys[1]} and {keys[2]}: give both (mutual TLS) or neither")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{'/'.join(keys)}: not usable PEM files ({exc})") from None
    return context


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files of an ``amqps://`` connection: a CA bundle trusted instead of the
    system's, and for mutual TLS a client certificate with its key."""

    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None

    def context(self) -> ssl.SSLContext | None:
        """The SSL context (None without any file); :class:`ConfigError` names a bad one."""
        return pem_context(self.ca_file, self.cert_file, self.key_file,
                           keys=("tls.ca_file", "tls.cert_file", "tls.key_file"))
