"""The balena API client against a fake API that is a real HTTP server (and MockTransport)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from engine.balena.api import BalenaApi, Fleet, literal
from engine.errors import InventoryError, InventorySourceError
from tests.support.balena_api import TOKEN, USERNAME, FakeBalenaApi, FakeDevice, uuid_of

FLEETS = {"myorg/gateways": 7, "myorg/cameras": 9}
ENV = "BALENA_API_KEY"
WRONG = "not-the-token-0123456789"


@pytest.fixture
def fake() -> Iterator[FakeBalenaApi]:
    """Five gateways (one offline) and two cameras, served on 127.0.0.1."""
    devices = [FakeDevice(uuid_of(n), f"gw-{n}", "myorg/gateways", online=n != 3) for n in range(5)]
    devices += [FakeDevice(uuid_of(10 + n), f"cam-{n}", "myorg/cameras") for n in range(2)]
    with FakeBalenaApi(FLEETS, devices) as api:
        api.start()
        yield api


def client(
    fake: FakeBalenaApi, *, token: str = TOKEN, retries: int = 3
) -> tuple[BalenaApi, list[float]]:
    waits: list[float] = []
    api = BalenaApi(fake.url, token, token_env=ENV, max_retries=retries, sleep=waits.append)
    return api, waits


def test_devices_come_page_by_page_by_key_until_an_empty_page(fake: FakeBalenaApi) -> None:
    """Every device of the asked fleets, in id order, paged by ``id gt <last>``."""
    api, _ = client(fake)
    with api:
        fleets = api.fleets(["myorg/gateways", "MyOrg/Cameras"])
        devices = api.devices(fleets, page_size=3)
    assert [f.slug for f in fleets] == ["myorg/gateways", "myorg/cameras"]
    assert [d["device_name"] for d in devices] == [f"gw-{n}" for n in range(5)] + ["cam-0", "cam-1"]
    pages = [r for r in fake.requests if r.startswith("/v7/device")]
    assert len(pages) == 4  # 3 + 3 + 1, then an empty page
    assert ["id gt 0" in pages[0], "id gt 1002" in pages[1], "id gt 1005" in pages[2]] == [True] * 3
    assert all("$orderby=id asc" in p and "$top=3" in p for p in pages)
    first = devices[0]
    assert first["belongs_to__application"][0]["slug"] == "myorg/gateways"
    assert isinstance(first["device_tag"], list)


def test_a_server_cap_below_the_page_size_does_not_cut_the_listing(fake: FakeBalenaApi) -> None:
    """A server that answers fewer than ``$top`` per page still yields every device."""
    fake.max_top = 2
    api, _ = client(fake)
    with api:
        devices = api.devices(api.fleets(["myorg/gateways"]), page_size=100)
    assert len(devices) == 5


def test_retry_after_is_honoured_on_429(fake: FakeBalenaApi) -> None:
    """A 429 waits the ``Retry-After`` seconds and asks again; the answer is complete."""
    fake.throttle = {2, 4}
    api, waits = client(fake)
    with api:
        devices = api.devices(api.fleets(["myorg/gateways"]), page_size=10)
    assert waits == [1.0, 1.0]
    assert len(devices) == 5


def test_retry_after_as_an_http_date_and_its_cap() -> None:
    """``Retry-After`` as an HTTP date waits until then, at most a minute."""
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:30 GMT"}),
            httpx.Response(429, headers={"Retry-After": "86400"}),
            httpx.Response(200, json={"actorType": "user", "username": "ops"}),
        ]
    )
    waits: list[float] = []
    api = BalenaApi(
        "https://api.example",
        TOKEN,
        token_env=ENV,
        sleep=waits.append,
        clock=lambda: datetime(2026, 10, 21, 7, 28, 0, tzinfo=UTC),
        transport=httpx.MockTransport(lambda _: next(answers)),
    )
    assert api.whoami().username == "ops"
    assert waits == [30.0, 60.0]


def test_whoami_names_the_user_and_falls_back_for_old_openbalena() -> None:
    """``/actor/v1/whoami`` gives the username; an API without it is asked ``/user/v1/whoami``."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/actor/v1/whoami":
            return httpx.Response(404, text="Not Found")
        return httpx.Response(200, json={"id": 3, "username": "admin", "email": "a@b.c"})

    api = BalenaApi(
        "https://api.example", TOKEN, token_env=ENV, transport=httpx.MockTransport(answer)
    )
    actor = api.whoami()
    assert (actor.actor_type, actor.username) == ("user", "admin")


def test_wrong_token_names_the_variable_and_never_the_token(fake: FakeBalenaApi) -> None:
    """401 is an InventoryError naming ``$BALENA_API_KEY``; no retry; the token is not quoted."""
    api, waits = client(fake, token=WRONG)
    with api, pytest.raises(InventoryError) as caught:
        api.whoami()
    message = str(caught.value)
    assert "refused the token in $BALENA_API_KEY (HTTP 401 Unauthorized)" in message
    assert f"{fake.url}/actor/v1/whoami" in message
    assert "not-the-token" not in message
    assert waits == []


def test_unknown_fleet_slug_is_named(fake: FakeBalenaApi) -> None:
    """A slug the API does not return is an input error listing it."""
    api, _ = client(fake)
    with api, pytest.raises(InventoryError, match=r"fleets: 'myorg/nope' not found on http://"):
        api.fleets(["myorg/gateways", "myorg/nope"])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("html", r"answered HTTP 200 OK with text/html, not JSON"),
        ("truncated", r"answered HTTP 200 OK with invalid JSON \(truncated\?\)"),
        (
            "down",
            (
                r"unavailable: GET http://127\.0\.0\.1:\d+/actor/v1/whoami: HTTP 503 Service "
                r"Unavailable \(gave up after 4 attempts\)"
            ),
        ),
    ],
)
def test_an_api_answering_nonsense_is_unavailable(
    fake: FakeBalenaApi, mode: str, expected: str
) -> None:
    """HTML, truncated JSON or a lasting 5xx is an InventorySourceError with URL and status."""
    fake.mode = mode
    api, waits = client(fake)
    with api, pytest.raises(InventorySourceError, match=expected):
        api.whoami()
    assert waits == ([0.5, 1.0, 2.0] if mode == "down" else [])


def test_unreachable_api_is_unavailable_after_retries() -> None:
    """Nothing listening: InventorySourceError naming the URL, after the bounded retries."""
    waits: list[float] = []
    api = BalenaApi("http://127.0.0.1:9", TOKEN, token_env=ENV, max_retries=2, sleep=waits.append)
    with pytest.raises(
        InventorySourceError,
        match=r"GET http://127\.0\.0\.1:9/actor/v1/whoami: "
        r"cannot connect .*\(gave up after 3 attempts\)",
    ):
        api.whoami()
    assert waits == [0.5, 1.0]


def test_devices_out_of_order_are_refused() -> None:
    """A page whose ids do not grow past the last one is nonsense (paging could loop)."""
    page = {"d": [{"id": 5}, {"id": 4}]}
    api = BalenaApi(
        "https://api.example",
        TOKEN,
        token_env=ENV,
        transport=httpx.MockTransport(lambda _: httpx.Response(200, json=page)),
    )
    with pytest.raises(InventorySourceError, match="not in increasing id order"):
        api.devices([Fleet(id=1, slug="o/f", name="f")], page_size=10)


def test_string_literals_are_quoted_as_pinejs_clients_do() -> None:
    """``'`` doubles and the text is percent-encoded, so a slug cannot end the literal."""
    assert literal("myorg/gate'ways") == "'myorg%2Fgate''ways'"
    assert literal("a b&c=d") == "'a%20b%26c%3Dd'"


def test_username_comes_from_whoami(fake: FakeBalenaApi) -> None:
    """The fake answers as balenaCloud does for a user's API key."""
    api, _ = client(fake)
    with api:
        actor = api.whoami()
    assert (actor.actor_type, actor.username) == ("user", USERNAME)
