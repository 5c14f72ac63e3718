"""``remediate serve``: the webhook server behind uvicorn, with a worker pool and clean stops.

Start-up: read the config (and check its TLS files), make the state directory private, open
the state database (migrating it), take the state directory's server lock when the backend
allows one server only (SQLite; replicas share a PostgreSQL database), mark runs a killed
predecessor left running as interrupted (never re-run), load the runbooks and the inventory,
start the workers, then listen (HTTPS with ``listen.tls``).  The process runs with umask
``077``.

SIGTERM or SIGINT: new webhooks get 503 (Alertmanager retries), workers claim nothing more,
running runs get ``shutdown_timeout`` to finish (then they are marked interrupted), queued
runs stay queued for the next start; then HTTP stops and the exit code is 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import uvicorn

from engine.audit import PER_HOST_EVENTS, AuditLog, AuditSink, configure_audit, utc_now
from engine.errors import ConfigError, StateError
from engine.privacy import PRIVATE_UMASK, private_state_dir
from engine.redaction import inventory_secrets
from engine.server.app import create_app
from engine.server.config import ServerConfig, load_server_config
from engine.server.runtime import WebhookServer
from engine.server.tls import UvicornTls, check_tls
from engine.settings import Settings
from engine.state import open_database

#: Exit code when HTTP serving stopped on its own (not on a signal).
EXIT_HTTP_FAILED = 3
#: Seconds a thread may run Python before another waiting for the GIL gets it.
GIL_SWITCH_INTERVAL = 0.0005


@contextmanager
def server_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``<state_dir>/server.lock``: one server process per state store."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "server.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StateError(
                f"{path}: another remediate server is using the state directory {state_dir}"
            ) from exc
        yield
    finally:
        os.close(fd)


def _listen(config: ServerConfig) -> socket.socket:
    host, port = config.listen.host, config.listen.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on connections of such sockets,
    # and without it every response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"listen {host}:{port}: cannot listen: {exc.strerror}") from exc
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def serve(config_path: Path, settings: Settings) -> int:
    """Run the webhook server until SIGTERM/SIGINT; return the exit code.

    Raises :class:`~engine.errors.EngineError` subclasses for start-up problems (bad
    configuration, runbooks or inventory; another server on the state directory).
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    umask = os.umask(PRIVATE_UMASK)
    try:
        config = load_server_config(config_path, os.environ)
        tls = check_tls(config.listen.tls) if config.listen.tls is not None else None
        # The server's own secrets are scrubbed from all it keeps, as the environment's are.
        known = (*config.secret_values, *inventory_secrets(config.inventory, os.environ))
        settings = settings.model_copy(update={"secrets": settings.secrets.with_values(known)})
        tightened = private_state_dir(settings.state_dir)
        if tightened is not None:
            sys.stderr.write(f"remediate serve: {tightened.warning()}\n")
        return _serve(config, settings, stop, tls)
    finally:
        os.umask(umask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(
    config: ServerConfig, settings: Settings, stop: threading.Event, tls: UvicornTls | None
) -> int:
    database = open_database(
        settings.database_url(config.state.url), clock=utc_now, connections=config.workers + 8
    )
    with contextlib.ExitStack() as stack:
        stack.callback(database.close)
        audit = database.audit_log() or AuditLog(
            settings.audit_path, unsynced_events=PER_HOST_EVENTS
        )
        configure_audit(audit, clock=utc_now, secrets=settings.secrets)
        if database.single_server:
            stack.enter_context(server_lock(settings.state_dir))
        server = WebhookServer(config, settings, clock=utc_now, database=database)
        stack.callback(server.close)
        return _run(server, config, audit, stop, tls)


def _run(
    server: WebhookServer,
    config: ServerConfig,
    audit: AuditSink,
    stop: threading.Event,
    tls: UvicornTls | None,
) -> int:
    """Recover, start, listen until stopped, drain; return the exit code."""
    server.recover()
    sock = _listen(config)
    http = uvicorn.Server(
        uvicorn.Config(
            create_app(server),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
            ssl_certfile=tls.ssl_certfile if tls else None,
            ssl_keyfile=tls.ssl_keyfile if tls else None,
            ssl_ca_certs=tls.ssl_ca_certs if tls else None,
            ssl_cert_reqs=tls.ssl_cert_reqs if tls else ssl.CERT_NONE,
        )
    )
    server.start()
    # Start-up made most of the objects the process will ever hold (modules, runbooks,
    # the inventory); keep them out of the cyclic collector's reach, or every full
    # collection walks them all and holds up intake for tens of milliseconds.
    gc.collect()
    gc.freeze()
    # The HTTP thread and the intake's committer share the GIL; with the default 5 ms
    # switch interval one thread's Python work holds up the other's (an answer waiting to
    # be sent, a notification to be parsed) for up to 5 ms.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    thread = threading.Thread(
        target=http.run, kwargs={"sockets": [sock]}, name="remediate-http", daemon=True
    )
    thread.start()
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    sys.stderr.write(f"remediate serve: listening on {scheme}://{host}:{port}\n")
    if not tls and not config.listen.loopback:
        sys.stderr.write(
            f"remediate serve: warning: plain HTTP on {host}: credentials and alerts cross "
            "the network in clear (set listen.tls)\n"
        )
    sys.stderr.flush()
    while not stop.wait(0.2):
        if not thread.is_alive():
            break
    http_failed = not stop.is_set()
    server.stop(config.shutdown_timeout.total_seconds())
    http.should_exit = True
    thread.join(15)
    sock.close()
    head = audit.head()
    if head is not None:
        server.store.save_audit_head(head.seq, head.hash)
    return EXIT_HTTP_FAILED if http_failed else 0
