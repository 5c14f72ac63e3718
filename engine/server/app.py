"""The HTTP edge (Starlette): webhook intake, health, metrics and read-only views.

========================  ====================================================================
``POST /webhook``         Alertmanager notification (version 4).  202 once recorded; 401
                          unauthenticated; 413 too large; 400 malformed (names the field);
                          503 draining or not recorded (Alertmanager retries 5xx).
``GET /healthz``          JSON: status, state database (URL without password, reachable),
                          breaker, queue and firing counts, inventory, workers; 503 while
                          draining or while the database does not answer.
``GET /metrics``          Prometheus text format.
``GET /alerts``           Recorded firings, newest first: ``?status=<outcome>&limit=N``.
``GET /queue``            Queue items, newest first: ``?state=<state>&limit=N``.
``POST /breaker/reset``   Close the circuit breaker now.
``GET /approvals``        Approvals of plans from ``approve``-mode triggers: ``?status=``.
``GET /approvals/{id}``   One approval with its saved plan.
``POST /approvals/{id}/   Decide (JSON body ``{"reason": ...}`` optional) as the approver whose
approve|deny``            token was presented; an approved plan is applied by a worker.
========================  ====================================================================

``/webhook``, ``/alerts``, ``/queue`` and ``/breaker/reset`` need the configured
authentication: ``Authorization: Bearer <token>`` and/or ``X-Remediate-Signature:
sha256=<hex HMAC-SHA256 of the raw body>`` (both when both are configured), compared in
constant time.  ``/healthz`` and ``/metrics`` show counts only and are open.  Approvals are
decided only with an approver's own token (``approvals.approvers`` in the configuration), so
the audit log names a person; the webhook credentials can list them but never decide.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from enum import StrEnum
from http import HTTPStatus
from typing import Any, TypeVar

import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.approvals import ApprovalError, decide
from engine.errors import StateError
from engine.server.alerts import BodyError, parse_webhook
from engine.server.config import Auth
from engine.server.queue import FiringOutcome, QueueState, RecordedAlerts
from engine.server.runtime import WebhookServer
from engine.state import ApprovalStatus

SIGNATURE_HEADER = "x-remediate-signature"
_E = TypeVar("_E", bound=StrEnum)
_MAX_LIST = 1000


class _RequestError(Exception):
    """A request answered with an error status (internal to this module)."""

    def __init__(self, status: int, error: str, **detail: object) -> None:
        super().__init__(error)
        self.status = status
        self.body = {"error": error, **detail}


def _latin1(text: str) -> bytes:
    return text.encode("latin-1", errors="replace")


def _bearer_ok(auth: Auth, headers: Headers) -> bool:
    if auth.token is None:
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    expected = _latin1(auth.token.get_secret_value())
    ok = hmac.compare_digest(_latin1(given.strip()), expected)
    return ok and scheme.lower() == "bearer"


def _signature_ok(auth: Auth, headers: Headers, body: bytes) -> bool:
    if auth.hmac_key is None:
        return True
    key = auth.hmac_key.get_secret_value().encode("utf-8")
    expected = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(
        _latin1(headers.get(SIGNATURE_HEADER, "").strip()), expected.encode()
    )


def _unauthenticated() -> _RequestError:
    return _RequestError(401, "unauthenticated")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _RequestError(400, "invalid Content-Length header", field="content-length")
        if int(declared) > limit:
            raise _RequestError(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _RequestError(413, f"body larger than {limit} bytes")
    return bytes(body)


async def _authenticated_body(server: WebhookServer, request: Request) -> bytes:
    auth = server.config.auth
    if not _bearer_ok(auth, request.headers):
        raise _unauthenticated()
    body = await _read_body(request, server.config.max_body_bytes)
    if not _signature_ok(auth, request.headers, body):
        raise _unauthenticated()
    return body


def _error(exc: _RequestError) -> JSONResponse:
    headers = None
    if exc.status == HTTPStatus.UNAUTHORIZED:
        headers = {"WWW-Authenticate": "Bearer"}
    elif exc.status == HTTPStatus.SERVICE_UNAVAILABLE:
        headers = {"Retry-After": "30"}
    return JSONResponse(exc.body, status_code=exc.status, headers=headers)


def _accepted(recorded: RecordedAlerts, alerts: int) -> dict[str, Any]:
    return {
        "status": "recorded",
        "alerts": alerts,
        "new": len(recorded.new),
        "deduplicated": len(recorded.deduplicated),
        "resolved": len(recorded.resolved),
        "queued": len(recorded.queued),
        "held": len(recorded.held),
        "cancelled": len(recorded.cancelled),
    }


def _limit(params: Mapping[str, str]) -> int:
    raw = params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_LIST:
        raise _RequestError(400, f"limit must be an integer from 1 to {_MAX_LIST}", field="limit")
    return int(raw)


def _choice(kind: type[_E], params: Mapping[str, str], name: str) -> _E | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError as exc:
        known = ", ".join(member.value for member in kind)
        raise _RequestError(400, f"{name} must be one of {known}", field=name) from exc


def _reason(body: bytes) -> str:
    """The optional ``{"reason": "..."}`` of a decision."""
    if not body.strip():
        return ""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise _RequestError(400, "invalid JSON body", field="reason") from exc
    reason = data.get("reason", "") if isinstance(data, dict) else None
    if not isinstance(reason, str):
        raise _RequestError(400, "reason must be a string", field="reason")
    return reason


class _Endpoints:
    """The request handlers of one server."""

    def __init__(self, server: WebhookServer) -> None:
        self.server = server
        self.metrics = server.metrics

    async def webhook(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await self._receive(request)
        except _RequestError as exc:
            response = _error(exc)
        self.metrics.webhook_requests.labels(str(response.status_code)).inc()
        self.metrics.webhook_duration.observe(time.perf_counter() - started)
        return response

    async def _receive(self, request: Request) -> Response:
        server = self.server
        if server.draining.is_set():
            raise _RequestError(503, "the server is shutting down; retry later")
        body = await _authenticated_body(server, request)
        try:
            message = parse_webhook(body)
        except BodyError as exc:
            raise _RequestError(400, "invalid body", field=exc.field, message=exc.message) from exc
        try:
            recorded = await asyncio.wrap_future(server.intake.submit(message))
        except StateError as exc:
            raise _RequestError(503, f"not recorded: {exc}") from exc
        return JSONResponse(_accepted(recorded, len(message.alerts)), status_code=202)

    def _health(self) -> tuple[int, dict[str, Any]]:
        server = self.server
        state = server.state_health()
        fleet = server.fleet.current
        draining = server.draining.is_set()
        counts: dict[str, Any] = {"queue": None, "firings": None}
        breaker = server.breaker.status
        if state["reachable"]:
            try:
                breaker = server.breaker.refresh(server.store)
                counts = {
                    "queue": {k.value: v for k, v in server.store.queue_counts().items()},
                    "firings": {k.value: v for k, v in server.store.firing_counts().items()},
                }
            except StateError as exc:
                state = {**state, "reachable": False, "error": str(exc)}
        if draining:
            status = "draining"
        elif not state["reachable"]:
            status = "state-unreachable"  # intake answers 503 until it can commit again
        else:
            status = "breaker-open" if breaker.open else "ok"
        return 200 if status in {"ok", "breaker-open"} else 503, {
            "status": status,
            "state": state,
            "breaker": breaker.model_dump(mode="json"),
            **counts,
            "inventory": {
                "path": str(fleet.inventory),
                "hosts": fleet.size,
                "loaded_at": fleet.loaded_at.isoformat() if fleet.loaded_at else None,
                "error": server.fleet.error,
            },
            "workers": {"count": server.config.workers, "running": len(server.pool.running)},
            "runbooks": sorted(server.router.runbooks),
        }

    async def healthz(self, request: Request) -> Response:
        del request
        code, body = await anyio.to_thread.run_sync(self._health)
        return JSONResponse(body, status_code=code)

    async def metrics_text(self, request: Request) -> Response:
        del request
        text = await anyio.to_thread.run_sync(self.metrics.render)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def alerts(self, request: Request) -> Response:
        try:
            await _authenticated_body(self.server, request)
            outcome = _choice(FiringOutcome, request.query_params, "status")
            limit = _limit(request.query_params)
        except _RequestError as exc:
            return _error(exc)
        firings = await anyio.to_thread.run_sync(self.server.store.list_firings, outcome, limit)
        return JSONResponse({"alerts": [f.model_dump(mode="json") for f in firings]})

    async def queue(self, request: Request) -> Response:
        try:
            await _authenticated_body(self.server, request)
            state = _choice(QueueState, request.query_params, "state")
            limit = _limit(request.query_params)
        except _RequestError as exc:
            return _error(exc)
        items = await anyio.to_thread.run_sync(self.server.store.list_queue, state, limit)
        return JSONResponse({"items": [i.model_dump(mode="json") for i in items]})

    def _approver(self, request: Request) -> str:
        """The configured approver whose bearer token the request carries."""
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and presented:
            for name, token in self.server.config.approvals.approvers.items():
                if hmac.compare_digest(
                    _latin1(presented.strip()), _latin1(token.get_secret_value())
                ):
                    return name
        raise _RequestError(401, "an approver's bearer token is required")

    async def _viewer(self, request: Request) -> None:
        """Approvals may be listed with the webhook credentials or an approver's token."""
        try:
            self._approver(request)
        except _RequestError:
            await _authenticated_body(self.server, request)

    async def approvals(self, request: Request) -> Response:
        try:
            await self._viewer(request)
            status = _choice(ApprovalStatus, request.query_params, "status")
        except _RequestError as exc:
            return _error(exc)
        store = self.server.store
        records = await anyio.to_thread.run_sync(store.list_approvals, status)
        return JSONResponse(
            {"approvals": [r.model_dump(mode="json", exclude={"plan"}) for r in records]}
        )

    async def approval(self, request: Request) -> Response:
        try:
            await self._viewer(request)
        except _RequestError as exc:
            return _error(exc)
        record = await anyio.to_thread.run_sync(
            self.server.store.get_approval, request.path_params["approval_id"]
        )
        if record is None:
            return _error(_RequestError(404, "no such approval"))
        return JSONResponse(record.model_dump(mode="json"))

    async def decide(self, request: Request) -> Response:
        if request.path_params["decision"] not in {"approve", "deny"}:
            return _error(_RequestError(404, "decide with /approve or /deny"))
        try:
            approver = self._approver(request)
            body = await _read_body(request, self.server.config.max_body_bytes)
            reason = _reason(body)
        except _RequestError as exc:
            return _error(exc)
        approve = request.path_params["decision"] == "approve"
        server = self.server
        try:
            record = await anyio.to_thread.run_sync(
                lambda: decide(
                    server.store,
                    request.path_params["approval_id"],
                    approver=approver,
                    approve=approve,
                    now=server.clock(),
                    reason=reason,
                )
            )
        except ApprovalError as exc:
            return _error(_RequestError(409, str(exc)))
        server.pool.wake()
        return JSONResponse(record.model_dump(mode="json", exclude={"plan"}))

    async def breaker_reset(self, request: Request) -> Response:
        try:
            await _authenticated_body(self.server, request)
        except _RequestError as exc:
            return _error(exc)
        server = self.server
        status = await anyio.to_thread.run_sync(
            lambda: server.breaker.reset(server.store, by="POST /breaker/reset")
        )
        return JSONResponse({"breaker": status.model_dump(mode="json")})


def create_app(server: WebhookServer) -> Starlette:
    """The ASGI application of ``server``."""
    endpoints = _Endpoints(server)
    return Starlette(
        routes=[
            Route("/webhook", endpoints.webhook, methods=["POST"]),
            Route("/healthz", endpoints.healthz, methods=["GET"]),
            Route("/metrics", endpoints.metrics_text, methods=["GET"]),
            Route("/alerts", endpoints.alerts, methods=["GET"]),
            Route("/queue", endpoints.queue, methods=["GET"]),
            Route("/breaker/reset", endpoints.breaker_reset, methods=["POST"]),
            Route("/approvals", endpoints.approvals, methods=["GET"]),
            Route("/approvals/{approval_id}", endpoints.approval, methods=["GET"]),
            Route("/approvals/{approval_id}/{decision:str}", endpoints.decide, methods=["POST"]),
        ]
    )
