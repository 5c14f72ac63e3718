"""The webhook contract in process: bodies, idempotency, resolve-cancels, auth, limits, hostiles."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from engine.audit import AuditLog, configure_audit
from engine.errors import StateError
from engine.executors.fake import FakeExecutor
from engine.outcomes import Mode
from engine.server.alerts import parse_webhook
from engine.server.app import SIGNATURE_HEADER, create_app
from engine.server.config import ServerConfig
from engine.server.queue import FiringOutcome, QueueState
from engine.server.runtime import WebhookServer
from engine.state import StateDatabase, open_database
from tests.support.probing import encode_records
from tests.support.stores import FaultyDatabase
from tests.support.webhook import (
    DISK_RUNBOOK,
    ENGINE_RUNBOOK,
    FIXTURE_UUID,
    FLEET,
    TOKEN,
    AppClient,
    Project,
    alert,
    body,
    fake_resolver,
    fixture_body,
    fleet_executor,
    wait_for,
    write_project,
)

HMAC_KEY = "hmac-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

HOSTILE = [
    "$(touch /tmp/remediate-pwned)",
    "`touch /tmp/remediate-pwned`",
    "dev-a; touch /tmp/remediate-pwned",
    "dev-a\ntouch /tmp/remediate-pwned",
    "{{ lookup('pipe', 'touch /tmp/remediate-pwned') }}",
    "{% raw %}dev-a{% endraw %}",
    "all",
    "*",
    "dev-*",
    "~dev-.*",
    "dev-a:dev-b",
    "!dev-b",
    "x" * 10240,
]


class Clock:
    """A fixed clock."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """Two triggered runbooks over a three-device fleet."""
    return write_project(
        tmp_path, runbooks={"disk.yml": DISK_RUNBOOK, "engine.yml": ENGINE_RUNBOOK}
    )


@pytest.fixture
def audit_path(tmp_path: Path) -> Iterator[Path]:
    """Events go to a real audit log in tmp_path."""
    path = tmp_path / "audit.jsonl"
    configure_audit(AuditLog(path))
    yield path
    structlog.reset_defaults()


ServerFactory = Callable[..., tuple[WebhookServer, AppClient]]


@pytest.fixture
def make_server(project: Project, audit_path: Path) -> Iterator[ServerFactory]:
    """Build a started server (no workers unless asked) and a client for its app."""
    del audit_path
    made: list[tuple[WebhookServer, AppClient]] = []

    def make(
        *,
        workers: int = 0,
        executor: FakeExecutor | None = None,
        database: StateDatabase | None = None,
        **fields: Any,
    ) -> tuple[WebhookServer, AppClient]:
        fields.setdefault("auth", {"token": TOKEN})
        config = ServerConfig.model_validate(
            {"inventory": project.inventory, "workers": workers, **fields}
        )
        server = WebhookServer(
            config,
            project.settings(),
            clock=Clock(),
            executor=executor or fleet_executor(),
            resolve=fake_resolver(FLEET),
            database=database,
        )
        server.start()
        client = AppClient(create_app(server))
        made.append((server, client))
        return server, client

    yield make
    for server, client in made:
        client.close()
        server.stop(timeout=30)
        server.close()


def _post(client: AppClient, payload: Any, headers: dict[str, str | bytes] | None = None) -> Any:
    return client.post("/webhook", json=payload, headers=AUTH if headers is None else headers)


def test_fixture_firing_body_queues_one_plan_run_on_the_inventory_host(
    make_server: ServerFactory,
) -> None:
    """The real firing body is recorded (202) and queues a dry run on the host the uuid names."""
    server, client = make_server()
    response = _post(client, fixture_body("firing-single.json"))
    assert response.status_code == 202
    assert response.json()["queued"] == 1
    (item,) = server.store.list_queue()
    assert (item.runbook, item.host, item.state) == ("disk-full", "dev-a", QueueState.QUEUED)
    assert (item.trigger_mode, item.mode) == ("plan", Mode.DRY_RUN)
    assert item.fingerprint == "65e1313268711ef4"


def test_duplicates_and_resends_are_deduplicated_not_queued_again(
    make_server: ServerFactory,
) -> None:
    """A re-sent group and a duplicated alert count as deduplicated; the firing queues once."""
    server, client = make_server()
    first = _post(client, fixture_body("firing-single.json")).json()
    again = _post(client, fixture_body("firing-single.json")).json()
    doubled = fixture_body("firing-single.json")
    doubled["alerts"] *= 2
    twice = _post(client, doubled).json()
    assert (first["new"], first["deduplicated"]) == (1, 0)
    assert (again["new"], again["deduplicated"], again["queued"]) == (0, 1, 0)
    assert (twice["new"], twice["deduplicated"], twice["queued"]) == (0, 2, 0)
    assert len(server.store.list_queue()) == 1
    (firing,) = server.store.list_firings()
    assert firing.times_seen == 4
    metrics = client.get("/metrics").text
    assert "remediate_alerts_deduplicated_total 3.0" in metrics


def test_a_new_startsat_is_a_new_firing(make_server: ServerFactory) -> None:
    """The same fingerprint firing again later (new startsAt) is a new firing, never a duplicate.

    While the first firing's run waits, the new one joins it; once that run is done, the next
    one queues a run again.
    """
    server, client = make_server()
    later = fixture_body("firing-single.json")
    later["alerts"][0]["startsAt"] = "2026-11-26T13:00:00.123456789Z"
    _post(client, fixture_body("firing-single.json"))
    joined = _post(client, later).json()
    assert (joined["new"], joined["queued"], joined["coalesced"]) == (1, 0, 1)
    (item,) = server.store.list_queue()
    claim = server.store.claim_queue_item(
        "test",
        now=item.enqueued_at,
        max_age=timedelta(hours=1),
        hold_reason=None,
        new_run_id=lambda: "r1",
    )
    assert claim.item == item.model_copy(
        update={
            "state": QueueState.RUNNING,
            "owner": "test",
            "claimed_at": item.enqueued_at,
            "run_id": "r1",
        }
    )
    server.store.finish_queue_item(item.item_id, "test", QueueState.DONE, now=item.enqueued_at)
    latest = fixture_body("firing-single.json")
    latest["alerts"][0]["startsAt"] = "2026-11-26T14:00:00Z"
    assert _post(client, latest).json()["queued"] == 1
    assert len(server.store.list_queue()) == 2


def test_resolved_after_firing_cancels_the_queued_run(
    make_server: ServerFactory, audit_path: Path
) -> None:
    """The resolved notification cancels the run not yet started and marks the firing resolved."""
    server, client = make_server()
    _post(client, fixture_body("firing-single.json"))
    response = _post(client, fixture_body("resolved-single.json"))
    assert response.status_code == 202
    assert response.json()["cancelled"] == 1
    (item,) = server.store.list_queue()
    assert item.state is QueueState.CANCELLED
    (firing,) = server.store.list_firings()
    assert firing.status == "resolved"
    assert firing.resolved_at is not None
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    first, then = [r for r in records if r["event"] == "alert.received"]
    (queued,) = first["notifications"][0]["alerts"]
    assert queued["outcome"] == "queued"
    assert queued["runs"] == [
        {
            "item": item.item_id,
            "runbook": item.runbook,
            "host": item.host,
            "trigger_mode": item.trigger_mode,
            "mode": item.mode.value,
        }
    ]
    (resolved,) = then["notifications"][0]["alerts"]
    assert resolved["outcome"] == "resolved"
    assert resolved["cancelled"] == queued["runs"]
    assert 'remediate_runs_total{outcome="cancelled"} 1.0' in client.get("/metrics").text


def test_warning_and_critical_of_one_file_system_start_one_run(
    make_server: ServerFactory, audit_path: Path
) -> None:
    """The node-mixin's warning and critical for one device: one run, both firings shown on it."""
    _, client = make_server()
    uuid = FLEET["dev-a"]["balena_uuid"]
    labels = {"alertname": "NodeFilesystemAlmostOutOfSpace", "mountpoint": "/mnt/data"}
    warning = alert({**labels, "balena_uuid": uuid, "severity": "warning"}, fingerprint="aa01")
    critical = alert({**labels, "balena_uuid": uuid, "severity": "critical"}, fingerprint="aa02")
    answer = _post(client, body(warning, critical)).json()
    assert (answer["new"], answer["queued"], answer["coalesced"]) == (2, 1, 1)
    (item,) = client.get("/queue", headers=AUTH).json()["items"]
    assert [(f["fingerprint"], f["status"]) for f in item["firings"]] == [
        ("aa01", "firing"),
        ("aa02", "firing"),
    ]
    (coalesced,) = client.get("/alerts?status=coalesced", headers=AUTH).json()["alerts"]
    assert coalesced["reason"] == f"joined queue item {item['item_id']} (queued)"
    assert "remediate_alerts_coalesced_total 1.0" in client.get("/metrics").text
    (received,) = [
        json.loads(line)
        for line in audit_path.read_text().splitlines()
        if json.loads(line)["event"] == "alert.received"
    ]
    first, second = received["notifications"][0]["alerts"]
    assert (first["outcome"], [r["item"] for r in first["runs"]]) == ("queued", [item["item_id"]])
    assert second["outcome"] == "coalesced"
    assert second["joined"] == [
        {"item": item["item_id"], "runbook": "disk-full", "host": "dev-a", "state": "queued"}
    ]
    # Resolving one of the two leaves the run queued; resolving the other cancels it.
    resolved = [dict(a, status="resolved") for a in (warning, critical)]
    assert _post(client, body(resolved[0], status="resolved")).json()["cancelled"] == 0
    assert _post(client, body(resolved[1], status="resolved")).json()["cancelled"] == 1


def test_resolved_before_firing_makes_a_late_firing_a_duplicate(
    make_server: ServerFactory,
) -> None:
    """A resolved alert never seen firing is recorded, so a late firing copy queues nothing."""
    server, client = make_server()
    _post(client, fixture_body("resolved-single.json"))
    late = _post(client, fixture_body("firing-single.json")).json()
    assert (late["queued"], late["deduplicated"]) == (0, 1)
    assert server.store.list_queue() == []
    (firing,) = server.store.list_firings()
    assert firing.outcome is FiringOutcome.RESOLVED


def test_unknown_fields_are_ignored(make_server: ServerFactory) -> None:
    """Fields of newer Alertmanager releases (and any others) are ignored, not rejected."""
    _, client = make_server()
    payload = fixture_body("firing-single.json")
    payload["notification_reason"] = "repeat"
    payload["routeLabels"] = {"team": "edge"}
    payload["somethingFromTheFuture"] = [1, 2, 3]
    payload["alerts"][0]["silencedBy"] = []
    payload["alerts"][0]["extra"] = {"nested": True}
    response = _post(client, payload)
    assert response.status_code == 202
    assert response.json()["queued"] == 1


def test_missing_optional_fields_are_tolerated(make_server: ServerFactory) -> None:
    """A body with only the fields routing needs is accepted."""
    _, client = make_server()
    minimal = {
        "version": "4",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    "alertname": "NodeFilesystemAlmostOutOfSpace",
                    "mountpoint": "/mnt/data",
                    "balena_uuid": FIXTURE_UUID,
                },
                "startsAt": "2026-11-26T11:03:48Z",
                "fingerprint": "00000000000000aa",
            }
        ],
    }
    response = _post(client, minimal)
    assert response.status_code == 202, response.text
    assert response.json()["queued"] == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b["alerts"][0].pop("startsAt"), "alerts.0.startsAt"),
        (lambda b: b["alerts"][0].update(startsAt="yesterday"), "alerts.0.startsAt"),
        (lambda b: b["alerts"][0].update(startsAt="2026-11-26T11:03:48"), "alerts.0.startsAt"),
        (lambda b: b["alerts"][0].pop("fingerprint"), "alerts.0.fingerprint"),
        (lambda b: b["alerts"][0].update(fingerprint="../../x"), "alerts.0.fingerprint"),
        (lambda b: b["alerts"][0].update(status="pending"), "alerts.0.status"),
        (lambda b: b["alerts"][0]["labels"].update(severity=3), "alerts.0.labels.severity"),
        (lambda b: b.update(version="3"), "version"),
        (lambda b: b.pop("alerts"), "alerts"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(
    make_server: ServerFactory, mutate: Callable[[dict[str, Any]], object], field: str
) -> None:
    """A malformed body is refused with 400 and the field's location; nothing is recorded."""
    server, client = make_server()
    payload = fixture_body("firing-single.json")
    mutate(payload)
    response = _post(client, payload)
    assert response.status_code == 400
    assert response.json()["field"] == field
    assert server.store.list_firings() == []


def test_a_body_that_is_not_json_is_400(make_server: ServerFactory) -> None:
    """Bytes that are not JSON are refused with 400."""
    _, client = make_server()
    response = client.post("/webhook", content=b"{not json", headers=AUTH)
    assert response.status_code == 400
    assert response.json()["field"] == "(body)"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer ünïcode-token-01234567".encode("latin-1")},
    ],
)
def test_bad_bearer_tokens_are_401(
    make_server: ServerFactory, headers: dict[str, str | bytes]
) -> None:
    """Without the configured bearer token the webhook answers 401 and records nothing."""
    server, client = make_server()
    response = _post(client, fixture_body("firing-single.json"), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert server.store.list_firings() == []


def _signed(payload: dict[str, Any], key: str = HMAC_KEY) -> tuple[bytes, str]:
    raw = json.dumps(payload).encode()
    return raw, "sha256=" + hmac.new(key.encode(), raw, hashlib.sha256).hexdigest()


def test_hmac_signature_of_the_raw_body_authenticates(make_server: ServerFactory) -> None:
    """With an HMAC key the body's signature is required; a wrong or another body's one is 401."""
    server, client = make_server(auth={"hmac_key": HMAC_KEY})
    raw, signature = _signed(fixture_body("firing-single.json"))
    other, _ = _signed(fixture_body("resolved-single.json"))
    _, wrong = _signed(fixture_body("firing-single.json"), key="another-key-0123456789")
    assert client.post("/webhook", content=raw).status_code == 401
    assert (
        client.post("/webhook", content=raw, headers={SIGNATURE_HEADER: wrong}).status_code == 401
    )
    assert (
        client.post("/webhook", content=other, headers={SIGNATURE_HEADER: signature}).status_code
        == 401
    )
    assert server.store.list_firings() == []
    ok = client.post("/webhook", content=raw, headers={SIGNATURE_HEADER: signature})
    assert ok.status_code == 202


def test_with_token_and_hmac_both_are_required(make_server: ServerFactory) -> None:
    """Configured together, the token and the signature are both needed."""
    _, client = make_server(auth={"token": TOKEN, "hmac_key": HMAC_KEY})
    raw, signature = _signed(fixture_body("firing-single.json"))
    assert client.post("/webhook", content=raw, headers=AUTH).status_code == 401
    assert (
        client.post("/webhook", content=raw, headers={SIGNATURE_HEADER: signature}).status_code
        == 401
    )
    both = {**AUTH, SIGNATURE_HEADER: signature}
    assert client.post("/webhook", content=raw, headers=both).status_code == 202


def test_no_authentication_refuses_to_start_unless_explicit(project: Project) -> None:
    """A config with neither token nor key is an error unless allow_unauthenticated is set."""
    with pytest.raises(ValueError, match="no authentication configured"):
        ServerConfig.model_validate({"inventory": project.inventory})
    open_config = ServerConfig.model_validate(
        {"inventory": project.inventory, "auth": {"allow_unauthenticated": True}}
    )
    assert not open_config.auth.configured


def test_oversized_bodies_are_413_by_length_and_by_stream(make_server: ServerFactory) -> None:
    """A body over the limit is 413 whether Content-Length says so or it is streamed chunked."""
    server, client = make_server(max_body_bytes=4096)
    big = fixture_body("firing-single.json")
    big["alerts"][0]["annotations"]["description"] = "x" * 5000
    assert _post(client, big).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        raw = json.dumps(big).encode()
        for start in range(0, len(raw), 1000):
            yield raw[start : start + 1000]

    streamed = client.post("/webhook", content=chunks(), headers=AUTH)
    assert streamed.status_code == 413
    assert server.store.list_firings() == []


def test_draining_server_answers_503(make_server: ServerFactory) -> None:
    """After SIGTERM (draining) new webhooks get 503 so Alertmanager retries elsewhere or later."""
    server, client = make_server()
    server.draining.set()
    response = _post(client, fixture_body("firing-single.json"))
    assert response.status_code == 503
    assert client.get("/healthz").json()["status"] == "draining"


def test_notifications_not_recorded_are_503_and_intake_goes_on(
    make_server: ServerFactory,
) -> None:
    """A store that cannot record answers 503 (Alertmanager retries), notification after one."""
    server, client = make_server()
    server.store.close()
    for _ in range(2):
        response = _post(client, fixture_body("firing-single.json"))
        assert response.status_code == 503
        assert response.json()["error"].startswith("not recorded:")


def test_a_closed_intake_records_nothing_more(make_server: ServerFactory) -> None:
    """After the intake is closed (the server is stopping) a notification is 503, not lost."""
    server, client = make_server()
    server.intake.close()
    response = _post(client, fixture_body("firing-single.json"))
    assert response.status_code == 503
    assert "stopping" in response.json()["error"]
    assert server.store.list_firings() == []


def test_unmatched_and_unresolved_alerts_are_recorded_and_listed(
    make_server: ServerFactory,
) -> None:
    """Alerts no trigger matches, or whose device is no host, are recorded with a reason, listed."""
    _, client = make_server()
    unmatched = alert({"alertname": "SomethingElse", "instance": "x"}, fingerprint="1111")
    unknown_device = alert(
        {
            "alertname": "NodeFilesystemAlmostOutOfSpace",
            "mountpoint": "/mnt/data",
            "balena_uuid": "f" * 32,
        },
        fingerprint="2222",
    )
    assert _post(client, body(unmatched, unknown_device)).json()["queued"] == 0
    listed = client.get("/alerts?status=unmatched", headers=AUTH).json()["alerts"]
    assert [a["fingerprint"] for a in listed] == ["1111"]
    assert listed[0]["reason"] == "no runbook trigger matches the alert"
    unresolved = client.get("/alerts?status=unresolved", headers=AUTH).json()["alerts"]
    assert [a["fingerprint"] for a in unresolved] == ["2222"]
    assert "balena_uuid" in unresolved[0]["reason"]
    health = client.get("/healthz").json()
    assert health["firings"]["unmatched"] == 1
    assert health["firings"]["unresolved"] == 1
    metrics = client.get("/metrics").text
    assert 'remediate_alerts_unmatched_total{outcome="unmatched"} 1.0' in metrics
    assert 'remediate_alerts_unmatched_total{outcome="unresolved"} 1.0' in metrics
    assert client.get("/alerts?status=bogus", headers=AUTH).status_code == 400
    assert client.get("/alerts").status_code == 401


def test_instance_label_with_port_resolves_by_host_var_and_queues_apply(
    make_server: ServerFactory,
) -> None:
    """``instance`` without its port matches the edge_id host var; an apply trigger applies."""
    server, client = make_server()
    down = alert(
        {"alertname": "BalenaEngineDown", "instance": "b1b2c3d.balena:9100", "job": "balena"},
        fingerprint="3333",
    )
    assert _post(client, body(down)).json()["queued"] == 1
    (item,) = server.store.list_queue()
    assert (item.runbook, item.host, item.mode) == ("engine-down", "dev-b", Mode.APPLY)


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda v: repr(v[:24]))
def test_hostile_device_labels_resolve_to_no_host(
    make_server: ServerFactory, hostile: str, audit_path: Path
) -> None:
    """A hostile device label matches no host exactly: recorded unresolved, nothing queued, run."""
    server, client = make_server()
    labels = {"alertname": "BalenaEngineDown", "instance": hostile, "job": "node"}
    response = _post(client, body(alert(labels, fingerprint="4444")))
    assert response.status_code == 202
    assert server.store.list_queue() == []
    (firing,) = server.store.list_firings()
    assert firing.outcome is FiringOutcome.UNRESOLVED
    assert firing.labels["instance"] == hostile
    assert hostile not in firing.reason
    assert not Path("/tmp/remediate-pwned").exists()
    received = [json.loads(line) for line in audit_path.read_text().splitlines()]
    (event,) = [r for r in received if r["event"] == "alert.received"]
    assert event["notifications"][0]["alerts"][0]["labels"]["instance"] == hostile


def test_hostile_other_labels_stay_data_through_a_run(
    make_server: ServerFactory, audit_path: Path
) -> None:
    """Hostile non-device labels reach the audit log verbatim and never a command or template."""
    executor = fleet_executor(scripts={"dev-a": _probe_answers})
    server, client = make_server(workers=1, executor=executor)
    labels = {
        "alertname": "NodeFilesystemAlmostOutOfSpace",
        "mountpoint": "/mnt/data",
        "balena_uuid": FIXTURE_UUID,
        "job": "$(touch /tmp/remediate-pwned)\n{{ 7 * 7 }}",
        "summary": "{% for x in range(3) %}boom{% endfor %}; `id`",
        "huge": "y" * 10240,
    }
    assert _post(client, body(alert(labels, fingerprint="5555"))).json()["queued"] == 1
    _wait_for_state(server, QueueState.DONE)
    sent = [c.script for c in executor.script_calls]
    assert sent
    for value in labels.values():
        if value not in {"NodeFilesystemAlmostOutOfSpace", "/mnt/data", FIXTURE_UUID}:
            assert all(value not in script for script in sent)
    assert executor.playbook_calls == []  # a plan trigger is a dry run
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    (received,) = [r for r in records if r["event"] == "alert.received"]
    assert received["notifications"][0]["alerts"][0]["labels"] == labels
    started = [r for r in records if r["event"] == "run.started"]
    assert started[0]["trigger"] == "alert:5555"
    assert started[0]["user"] == "alertmanager"
    assert started[0]["limit"] == "dev-a"
    assert not Path("/tmp/remediate-pwned").exists()


def _probe_answers(script: str) -> str:
    return encode_records(script, {"free": "5"})


def _wait_for_state(server: WebhookServer, state: QueueState) -> None:
    wait_for(
        f"a queue item in state {state.value}",
        lambda: any(i.state is state for i in server.store.list_queue()),
        timeout=60,
    )


def test_concurrent_notifications_are_group_committed_each_answered(
    make_server: ServerFactory, audit_path: Path
) -> None:
    """Notifications recorded from many threads at once are each committed and each answered."""
    # 24 devices alerting at once is a storm: the breaker (checked in the background) is kept
    # out of the way, or some runs would be held depending on when it looked.
    server, _ = make_server(breaker={"max_alerting_pct": 100})
    uuids = [v["balena_uuid"] for v in FLEET.values()]
    messages = [
        parse_webhook(
            json.dumps(
                body(
                    alert(
                        {
                            "alertname": "NodeFilesystemAlmostOutOfSpace",
                            "mountpoint": "/mnt/data",
                            "balena_uuid": uuids[n % len(uuids)],
                        },
                        fingerprint=f"{n:016x}",
                    )
                )
            ).encode()
        )
        for n in range(24)
    ]
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(server.intake.record, messages))
    # One run per device: the first firing of each queues it, the others join it.
    assert [len(r.queued) + len(r.coalesced) for r in results] == [1] * 24
    assert sum(len(r.queued) for r in results) == len(uuids)
    assert len(server.store.list_queue(limit=100)) == len(uuids)
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    notifications = [
        n for r in records if r["event"] == "alert.received" for n in r["notifications"]
    ]
    assert len(notifications) == 24


class _Fatal(BaseException):
    """A fault no worker is meant to survive (as ``SystemExit`` is)."""


def _faulty(project: Project, **faults: Any) -> FaultyDatabase:
    database = open_database(project.settings().database_url(), clock=Clock())
    return FaultyDatabase(database, **faults)


def test_workers_survive_store_errors_and_faults_then_run_the_queue(
    make_server: ServerFactory, project: Project
) -> None:
    """A worker whose store cannot open, then whose claim fails twice, backs off and runs on."""
    faulty = _faulty(
        project,
        faults={
            "claim_queue_item": [
                StateError("state.db: state store cannot claim: database is locked"),
                RuntimeError("a fault of the engine's own"),
            ]
        },
        open_faults=[StateError("state.db: state store cannot open: disk I/O error")],
    )
    executor = fleet_executor(scripts={"dev-a": _probe_answers})
    with capture_logs() as events:
        server, client = make_server(workers=1, executor=executor, database=faulty)
        assert _post(client, fixture_body("firing-single.json")).json()["queued"] == 1
        _wait_for_state(server, QueueState.DONE)
    # The worker's store (the watchers' never claim).
    assert [s.raised for s in faulty.stores if s.raised] == [["claim_queue_item"] * 2]
    logged = [e for e in events if e["event"].startswith("worker.")]
    assert [(e["event"], e["retry_in"]) for e in logged] == [
        ("worker.state_error", 1.0),
        ("worker.state_error", 2.0),
        ("worker.error", 4.0),
    ]
    assert "disk I/O error" in logged[0]["error"]
    assert logged[2]["exc_info"] is True  # the traceback is logged
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["workers"] == {"count": 1, "alive": 1, "failing": 0, "running": 0}
    faulty.close()


def test_healthz_is_503_when_no_configured_worker_is_alive(
    make_server: ServerFactory, project: Project
) -> None:
    """Workers configured but none alive: /healthz says so with a 503 (firings would never run)."""
    faulty = _faulty(project, faults={"claim_queue_item": [_Fatal("gone")]})
    with capture_logs() as events:
        server, client = make_server(workers=2, database=faulty)
        wait_for("both workers ended", lambda: server.pool.alive == 0, timeout=30)
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "no-workers"
    assert health.json()["workers"] == {"count": 2, "alive": 0, "failing": 0, "running": 0}
    assert [e["event"] for e in events if e["event"].startswith("worker.")] == ["worker.died"] * 2
    faulty.close()
