"""A client for the few balena API calls the inventory needs (balenaCloud or openBalena).

Calls, as balena-sdk makes them (``auth.whoami``, ``application.get``,
``device.get_all_by_application``), against the OData API (pinejs, ``v7``):

* ``GET /actor/v1/whoami`` (``/user/v1/whoami`` on older openBalena): who the token is; the
  tunnel authenticates as that username;
* ``GET /v7/application?$select=id,slug,app_name&$filter=(slug eq '<slug>') or ...``: the
  fleets, one request for all of them; a slug the API does not return is unknown (or not
  visible to the token);
* ``GET /v7/device?$select=...&$filter=... and (id gt <last>)&$expand=belongs_to__application,
  device_tag,is_of__device_type&$orderby=id asc&$top=<page>``: the devices, paged by key (the
  last id seen), which neither skips nor repeats a device when others are added or removed
  between pages (``$skip`` would); the listing ends at the first empty page, so a server cap
  on ``$top`` below the page size cannot cut it short.

Results are under ``d``; expanded links are lists.  Query strings are written as the pinejs
clients write them (``$`` options, string literals quoted with ``''`` and percent-encoded).

httpx rather than balena-sdk: these are a handful of documented GETs, httpx is a kept client
the project already uses, and balena-sdk 17 would pull Twisted, pyOpenSSL, requests,
pine-client, PyJWT, ratelimit, semver and deprecated into every ``ansible-playbook`` process
that reads the inventory.

Retries: a 429 waits ``Retry-After`` (seconds or an HTTP date, at most
:data:`MAX_RETRY_AFTER`); a 5xx answer or a connection failure waits 0.5, 1, 2, 4… s; at most
``max_retries`` retries.  401/403 raise :class:`InventoryError` naming the token variable; an
API that stays unavailable or answers something that is not the expected JSON raises
:class:`InventorySourceError` with the URL and the status.  The token is sent only in the
``Authorization`` header and appears in no message.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from engine.errors import InventoryError, InventorySourceError

#: The longest ``Retry-After`` honoured, in seconds (a longer one waits this long).
MAX_RETRY_AFTER = 60.0
_BACKOFF_START, _BACKOFF_MAX = 0.5, 8.0
_API_VERSION = "v7"

DEVICE_FIELDS = (
    "id",
    "uuid",
    "device_name",
    "is_online",
    "is_connected_to_vpn",
    "api_heartbeat_state",
    "os_version",
    "os_variant",
    "supervisor_version",
    "ip_address",
)
DEVICE_EXPAND = (
    "belongs_to__application($select=id,slug,app_name)",
    "device_tag($select=tag_key,value)",
    "is_of__device_type($select=slug)",
)


@dataclass(frozen=True)
class Actor:
    """Who the token belongs to: a user (with a username) or a fleet/device key."""

    actor_type: str
    username: str | None


@dataclass(frozen=True)
class Fleet:
    """A fleet (application) the token can see."""

    id: int
    slug: str
    name: str


def literal(text: str) -> str:
    """An OData string literal, as pinejs clients write it: ``''`` for ``'``, percent-encoded."""
    return "'" + quote(text.replace("'", "''"), safe="~()*!'") + "'"


def _query(options: Mapping[str, str]) -> str:
    return "&".join(f"{key}={value.replace(' ', '%20')}" for key, value in options.items())


class BalenaApi:
    """The balena API at ``url``, called with ``token`` (from the variable ``token_env``)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        token_env: str,
        ca_file: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._token_env = token_env
        self._max_retries = max_retries
        self._sleep = sleep
        self._clock = clock
        self._client = httpx.Client(
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "X-Balena-Client": "remediate",
            },
            timeout=timeout,
            verify=ca_file if ca_file else True,
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> BalenaApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the calls ---------------------------------------------------------------------------

    def whoami(self) -> Actor:
        """Who the token is (``/actor/v1/whoami``, else ``/user/v1/whoami``)."""
        answer = self._get("/actor/v1/whoami", {}, missing_ok=True)
        if answer is None:  # openBalena before the actor model
            answer = self._get("/user/v1/whoami", {})
            if isinstance(answer, dict):
                answer = {"actorType": "user", **answer}
        if not isinstance(answer, dict) or not isinstance(answer.get("actorType", "user"), str):
            raise self._nonsense("/actor/v1/whoami", "not a JSON object with actorType")
        username = answer.get("username")
        return Actor(
            actor_type=str(answer.get("actorType", "user")),
            username=username if isinstance(username, str) and username else None,
        )

    def fleets(self, slugs: Sequence[str]) -> list[Fleet]:
        """The fleets with these slugs, in that order; an unknown slug is an InventoryError."""
        wanted = list(dict.fromkeys(s.lower() for s in slugs))
        path = f"/{_API_VERSION}/application"
        found: dict[str, Fleet] = {}
        for row in self._rows(
            path,
            {
                "$select": "id,slug,app_name",
                "$filter": " or ".join(f"(slug eq {literal(s)})" for s in wanted),
            },
        ):
            fleet_id, slug = row.get("id"), row.get("slug")
            if not isinstance(fleet_id, int) or not isinstance(slug, str):
                raise self._nonsense(path, "an application without an integer id and a slug")
            found[slug.lower()] = Fleet(id=fleet_id, slug=slug, name=str(row.get("app_name", "")))
        unknown = [s for s in wanted if s not in found]
        if unknown:
            raise InventoryError(
                f"fleets: {', '.join(repr(s) for s in unknown)} not found on {self.url} "
                "(check the slug, org/fleet, and that the token's user can see the fleet)"
            )
        return [found[s] for s in wanted]

    def devices(self, fleets: Sequence[Fleet], *, page_size: int) -> list[dict[str, Any]]:
        """Every device of ``fleets`` (raw API objects), fetched page by page in id order."""
        if not fleets:
            return []
        path = f"/{_API_VERSION}/device"
        owners = " or ".join(f"(belongs_to__application eq {f.id})" for f in fleets)
        devices: list[dict[str, Any]] = []
        last = 0
        while True:
            page = list(
                self._rows(
                    path,
                    {
                        "$select": ",".join(DEVICE_FIELDS),
                        "$filter": f"({owners}) and (id gt {last})",
                        "$expand": ",".join(DEVICE_EXPAND),
                        "$orderby": "id asc",
                        "$top": str(page_size),
                    },
                )
            )
            if not page:
                return devices
            ids = [row.get("id") for row in page]
            if not all(isinstance(i, int) and i > last for i in ids):
                raise self._nonsense(path, "a page of devices not in increasing id order")
            devices.extend(page)
            last = max(i for i in ids if isinstance(i, int))

    # -- HTTP ----------------------------------------------------------------------------------

    def _rows(self, path: str, options: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        answer = self._get(path, options)
        rows = answer.get("d") if isinstance(answer, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise self._nonsense(path, "no list of objects under 'd'")
        yield from rows

    def _get(self, path: str, options: Mapping[str, str], *, missing_ok: bool = False) -> Any:
        """The JSON answer of ``GET path?options``; None for a 404 when ``missing_ok``."""
        where = f"{self.url}{path}"
        url = where + ("?" + _query(options) if options else "")
        attempt = 0
        while True:
            answer = self._attempt(url, where, missing_ok)
            if not isinstance(answer, _Retry):
                return answer
            if attempt >= self._max_retries:
                raise InventorySourceError(
                    f"balena API unavailable: GET {where}: {answer.problem} "
                    f"(gave up after {attempt + 1} attempts)"
                )
            self._sleep(answer.wait if answer.wait is not None else _backoff(attempt))
            attempt += 1

    def _attempt(self, url: str, where: str, missing_ok: bool) -> Any:
        """One GET: the JSON answer, or a :class:`_Retry`; raises for answers not worth a retry."""
        try:
            response = self._client.get(url)
        except httpx.TimeoutException:
            return _Retry("no answer in time")
        except httpx.TransportError as exc:
            return _Retry(f"cannot connect ({_first_line(exc)})")
        status = f"HTTP {response.status_code} {response.reason_phrase}".strip()
        code = response.status_code
        if code in {httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN}:
            raise InventoryError(
                f"balena API {where} refused the token in ${self._token_env} ({status}): "
                + (
                    "export a valid API key or session token"
                    if code == httpx.codes.UNAUTHORIZED
                    else "the token's user may not read this"
                )
            )
        if code == httpx.codes.TOO_MANY_REQUESTS:
            return _Retry(status, self._retry_after(response))
        if code >= httpx.codes.INTERNAL_SERVER_ERROR:
            return _Retry(status)
        if code == httpx.codes.NOT_FOUND and missing_ok:
            return None
        if code != httpx.codes.OK:
            raise InventorySourceError(f"balena API GET {where} answered {status}")
        kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
        if "json" not in kind:
            raise InventorySourceError(
                f"balena API GET {where} answered {status} with {kind}, not JSON "
                "(is api_url the API, e.g. https://api.balena-cloud.com?)"
            )
        try:
            return json.loads(response.content)
        except ValueError as exc:
            raise InventorySourceError(
                f"balena API GET {where} answered {status} with invalid JSON (truncated?): {exc}"
            ) from None

    def _retry_after(self, response: httpx.Response) -> float | None:
        value = response.headers.get("retry-after", "").strip()
        if value.isdigit():
            return min(float(value), MAX_RETRY_AFTER)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return min(max((when - self._clock()).total_seconds(), 0.0), MAX_RETRY_AFTER)

    def _nonsense(self, path: str, what: str) -> InventorySourceError:
        return InventorySourceError(f"balena API GET {self.url}{path} answered {what}")


@dataclass(frozen=True)
class _Retry:
    """An answer worth another attempt: why, and how long to wait (None: back off)."""

    problem: str
    wait: float | None = None


def _backoff(attempt: int) -> float:
    return float(min(_BACKOFF_START * 2**attempt, _BACKOFF_MAX))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
