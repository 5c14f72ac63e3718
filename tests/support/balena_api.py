"""A fake balena API: a real HTTP(S) server answering as balenaCloud's API does.

Shapes follow the real API (balena-sdk-python's models and pinejs' OData): results under
``d``, every object with ``__metadata``, expanded links (``belongs_to__application``,
``device_tag``, ``is_of__device_type``) as lists, ``$select`` honoured, ``$filter`` read for
the forms the inventory sends (``slug eq '…'``, ``belongs_to__application eq N``,
``id gt N``), ``$orderby=id asc`` and ``$top``.  ``/actor/v1/whoami`` answers as for a user's
API key.  Knobs for bad days: :attr:`FakeBalenaApi.throttle` (429s with ``Retry-After``),
:attr:`FakeBalenaApi.mode` (``html``, ``truncated``, ``down``) and :attr:`FakeBalenaApi.max_top`
(a server cap on ``$top``).  Every request is recorded (path and query, never headers).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

TOKEN = "b4l3n4t0k3n0123456789abcdefABCDEF"  # noqa: S105 - a test credential
USERNAME = "gh_fleetops"

_SLUG_TERM = re.compile(r"slug eq '((?:[^']|'')*)'")
_OWNER_TERM = re.compile(r"belongs_to__application eq ([0-9]+)")
_AFTER_TERM = re.compile(r"id gt ([0-9]+)")


@dataclass
class FakeDevice:
    """A device of the fake fleet (what the API stores about it)."""

    uuid: str
    name: str
    fleet: str
    online: bool = True
    os_version: str | None = "balenaOS 2.83.18+rev5"
    os_variant: str | None = "prod"
    supervisor_version: str | None = "12.11.38"
    device_type: str = "raspberrypi4-64"
    tags: Mapping[str, str] = field(default_factory=dict)
    ip_address: str | None = "192.168.1.20"


def uuid_of(n: int) -> str:
    """A 32-hex uuid derived from ``n`` (stable across runs, random-looking like real ones)."""
    return hashlib.sha256(f"device {n}".encode()).hexdigest()[:32]


class FakeBalenaApi:
    """The fake API; :meth:`start` serves it on a socket (optionally TLS)."""

    def __init__(
        self,
        fleets: Mapping[str, int],
        devices: Sequence[FakeDevice],
        *,
        token: str = TOKEN,
        username: str = USERNAME,
    ) -> None:
        self.fleets = dict(fleets)
        self.devices = list(devices)
        self.token = token
        self.username = username
        self.mode = "ok"
        #: Requests (counted from 1) that get a 429 with ``Retry-After: 1``.
        self.throttle: set[int] = set()
        self.max_top: int | None = None
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- serving -------------------------------------------------------------------------------

    def start(
        self,
        sock: socket.socket | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        name: str | None = None,
    ) -> str:
        """Serve on ``sock`` (a listening socket; default a new one on 127.0.0.1); the URL."""
        if sock is None:
            sock = socket.create_server(("127.0.0.1", 0))
        host, port = sock.getsockname()[:2]
        if tls is not None:
            sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        api = self

        class Handler(_Handler):
            fake = api

        server = ThreadingHTTPServer((host, port), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{name or host}:{port}"
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeBalenaApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answers -------------------------------------------------------------------------------

    def answer(self, path: str, query: Mapping[str, str], auth: str | None) -> tuple[int, Any]:
        """Status and JSON body (or a str body) for one GET."""
        with self._lock:
            self.requests.append(path + ("?" + "&".join(f"{k}={v}" for k, v in query.items())))
            number = len(self.requests)
        if auth != f"Bearer {self.token}":
            return 401, "Unauthorized"
        if number in self.throttle:
            return 429, "Too Many Requests"
        if self.mode == "down":
            return 503, "<html><body>Service Unavailable</body></html>"
        if path == "/actor/v1/whoami":
            return 200, {
                "id": 2041,
                "actorType": "user",
                "actorTypeId": 1703,
                "username": self.username,
                "email": f"{self.username}@example.com",
            }
        if path == "/v7/application":
            slugs = [unquote(s).replace("''", "'") for s in _SLUG_TERM.findall(query["$filter"])]
            rows = [
                {
                    "__metadata": {"uri": f"/resin/application(@id)?@id={self.fleets[s]}"},
                    "id": self.fleets[s],
                    "slug": s,
                    "app_name": s.split("/")[1],
                }
                for s in slugs
                if s in self.fleets
            ]
            return 200, {"d": [_selected(r, query.get("$select")) for r in rows]}
        if path == "/v7/device":
            return 200, {"d": self._device_page(query)}
        return 404, "Not Found"

    def _device_page(self, query: Mapping[str, str]) -> list[dict[str, Any]]:
        condition = query["$filter"]
        owners = {int(i) for i in _OWNER_TERM.findall(condition)}
        after = _AFTER_TERM.search(condition)
        last = int(after[1]) if after else 0
        assert query.get("$orderby") == "id asc", "paging by key needs $orderby=id asc"
        top = int(query.get("$top", "1000000"))
        if self.max_top is not None:
            top = min(top, self.max_top)
        ids = {uuid: 1000 + n for n, uuid in enumerate(d.uuid for d in self.devices)}
        rows = [
            self._device_row(d, ids[d.uuid], query.get("$select"))
            for d in self.devices
            if self.fleets.get(d.fleet) in owners and ids[d.uuid] > last
        ]
        return sorted(rows, key=lambda r: int(r["id"]))[:top]

    def _device_row(self, device: FakeDevice, device_id: int, select: str | None) -> dict[str, Any]:
        fleet_id = self.fleets[device.fleet]
        row = {
            "__metadata": {"uri": f"/resin/device(@id)?@id={device_id}"},
            "id": device_id,
            "uuid": device.uuid,
            "device_name": device.name,
            "is_online": device.online,
            "is_connected_to_vpn": device.online,
            "api_heartbeat_state": "online" if device.online else "offline",
            "os_version": device.os_version,
            "os_variant": device.os_variant,
            "supervisor_version": device.supervisor_version,
            "ip_address": device.ip_address,
            "status": "Idle",
            "created_at": "2024-03-01T10:00:00.000Z",
        }
        row = _selected(row, select)
        row["belongs_to__application"] = [
            {
                "__metadata": {"uri": f"/resin/application(@id)?@id={fleet_id}"},
                "id": fleet_id,
                "slug": device.fleet,
                "app_name": device.fleet.split("/")[1],
            }
        ]
        row["device_tag"] = [
            {"__metadata": {"uri": "/resin/device_tag(@id)?@id=1"}, "tag_key": k, "value": v}
            for k, v in device.tags.items()
        ]
        row["is_of__device_type"] = [
            {"__metadata": {"uri": "/resin/device_type(@id)?@id=58"}, "slug": device.device_type}
        ]
        return row


def _selected(row: Mapping[str, Any], select: str | None) -> dict[str, Any]:
    if select is None:
        return dict(row)
    keep = {"__metadata", *select.split(",")}
    return {k: v for k, v in row.items() if k in keep}


def _query(text: str) -> dict[str, str]:
    """``$key=value`` pairs; values percent-decoded (no ``+`` for space: OData clients send %20)."""
    pairs = (part.partition("=") for part in text.split("&") if part)
    return {unquote(k): unquote(v) for k, _, v in pairs}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeBalenaApi
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        status, body = self.fake.answer(
            split.path, _query(split.query), self.headers.get("Authorization")
        )
        mode = self.fake.mode
        if status == 200 and mode == "html":
            status, body = 200, "<!doctype html><html><body>balena dashboard</body></html>"
        if isinstance(body, str):
            payload, kind = body.encode(), "text/html" if body.startswith("<") else "text/plain"
        else:
            payload, kind = json.dumps(body).encode(), "application/json; charset=utf-8"
            if mode == "truncated":
                payload = payload[: max(1, len(payload) // 2)]
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        if status == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the requests are recorded in ``fake.requests``."""


def online_uuids(api: FakeBalenaApi) -> Iterator[str]:
    """The uuids of the fake fleet's online devices."""
    return (d.uuid for d in api.devices if d.online)
