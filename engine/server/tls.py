"""TLS on the webhook: the files of ``listen.tls`` checked before the server listens.

uvicorn loads them itself (``ssl_certfile``, ``ssl_keyfile``, ``ssl_ca_certs``) and wraps
the sockets it is given with that context; with ``client_ca`` it requires a client
certificate signed by it (``ssl.CERT_REQUIRED``).  Python's default context allows TLS 1.2
and later only.  Problems are found here first, so that they stop the start with one clear
line naming the file, instead of ending uvicorn's thread later.
"""

from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass

from engine.errors import ConfigError
from engine.server.config import Tls


@dataclass(frozen=True)
class UvicornTls:
    """uvicorn's SSL options for ``listen.tls``."""

    ssl_certfile: str
    ssl_keyfile: str
    ssl_ca_certs: str | None
    ssl_cert_reqs: int


def check_tls(tls: Tls) -> UvicornTls:
    """Check that ``tls``'s files can be used; uvicorn's options for them.

    The key must be readable by its owner only; the certificate must match it; the client
    CA file must hold at least one certificate.
    """
    for what, path in (("certificate", tls.cert), ("key", tls.key), ("client CA", tls.client_ca)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: listen.tls: the TLS {what} file does not exist")
    mode = stat.S_IMODE(tls.key.stat().st_mode)
    if mode & 0o044:
        raise ConfigError(
            f"{tls.key}: listen.tls.key: the private key is readable by group or others "
            f"(mode {mode:04o}): make it readable by its owner only (chmod 600)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{tls.cert}: listen.tls: cannot use this certificate with the key {tls.key}: "
            f"{_reason(exc)}"
        ) from exc
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{tls.client_ca}: listen.tls.client_ca: not a PEM CA certificate: {_reason(exc)}"
            ) from exc
    return UvicornTls(
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
        ssl_ca_certs=None if tls.client_ca is None else str(tls.client_ca),
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca is not None else ssl.CERT_NONE,
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
