"""Routing: trigger matching, device label → exactly one inventory host, and the mode seam."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.outcomes import Mode
from engine.runbooks import load_runbooks
from engine.runbooks.spec import TriggerMode
from engine.server.alerts import Alert
from engine.server.fleet import Fleet, load_fleet
from engine.server.queue import FiringOutcome
from engine.server.routing import Matcher, Mismatch, Router, run_mode, strip_port
from tests.support.webhook import (
    DISK_RUNBOOK,
    ENGINE_RUNBOOK,
    FIXTURE_UUID,
    FLEET,
    fake_resolver,
    write_project,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _alert(**labels: str) -> Alert:
    return Alert.model_validate(
        {
            "status": "firing",
            "labels": labels,
            "startsAt": "2026-11-26T11:03:48Z",
            "fingerprint": "abc",
        }
    )


@pytest.fixture
def router(tmp_path: Path) -> Router:
    """A router over the disk and engine runbooks."""
    project = write_project(
        tmp_path, runbooks={"disk.yml": DISK_RUNBOOK, "engine.yml": ENGINE_RUNBOOK}
    )
    return Router(load_runbooks([project.runbooks], playbooks_dir=project.playbooks))


def _fleet(router: Router, hosts: dict[str, dict[str, str]] = FLEET) -> Fleet:
    return load_fleet(Path("hosts.ini"), router.index_keys, fake_resolver(hosts), NOW)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("dev-a:9100", "dev-a"),
        ("10.0.0.1:9100", "10.0.0.1"),
        ("[fe80::1]:9100", "fe80::1"),
        ("dev-a", "dev-a"),
        ("fe80::1", "fe80::1"),
        ("dev-a:http", "dev-a:http"),
        (":9100", ":9100"),
        ("dev-a:99999999", "dev-a:99999999"),
    ],
)
def test_strip_port(value: str, expected: str) -> None:
    """Only a numeric port suffix is dropped; IPv6 literals keep their colons."""
    assert strip_port(value) == expected


def test_trigger_modes_map_to_run_modes() -> None:
    """Trigger mode apply applies; plan and (until approvals are wired) approve are dry runs."""
    assert run_mode(TriggerMode.APPLY) is Mode.APPLY
    assert run_mode(TriggerMode.PLAN) is Mode.DRY_RUN
    assert run_mode(TriggerMode.APPROVE) is Mode.DRY_RUN


def test_match_labels_must_be_equal(router: Router) -> None:
    """A ``match`` label with another value (or missing) means no match."""
    fleet = _fleet(router)
    other_mount = _alert(
        alertname="NodeFilesystemAlmostOutOfSpace", mountpoint="/", balena_uuid=FIXTURE_UUID
    )
    missing = _alert(alertname="NodeFilesystemAlmostOutOfSpace", balena_uuid=FIXTURE_UUID)
    assert router.route(other_mount, fleet).outcome is FiringOutcome.UNMATCHED
    assert router.route(missing, fleet).outcome is FiringOutcome.UNMATCHED


def test_match_re_must_match_the_whole_value(router: Router) -> None:
    """``match_re`` is a full match: ``node`` matches, ``nodes`` and ``a-node`` do not."""
    fleet = _fleet(router)
    for job, outcome in [
        ("node", FiringOutcome.QUEUED),
        ("balena", FiringOutcome.QUEUED),
        ("nodes", FiringOutcome.UNMATCHED),
        ("a-node", FiringOutcome.UNMATCHED),
    ]:
        alert = _alert(alertname="BalenaEngineDown", instance="a1b2c3d.balena:9100", job=job)
        assert router.route(alert, fleet).outcome is outcome, job


def test_device_by_host_var_resolves_to_the_inventory_name(router: Router) -> None:
    """The uuid label is compared with the balena_uuid host var; the route carries the host name."""
    routing = router.route(
        _alert(
            alertname="NodeFilesystemSpaceFillingUp", mountpoint="/mnt/data", balena_uuid="b" * 32
        ),
        _fleet(router),
    )
    assert routing.outcome is FiringOutcome.QUEUED
    (route,) = routing.routes
    assert (route.runbook, route.host, route.trigger_mode) == ("disk-full", "dev-b", "plan")


def test_a_device_on_two_hosts_is_ambiguous(router: Router) -> None:
    """Two hosts with the same uuid: the device is not exactly one host, nothing is routed."""
    hosts = {**FLEET, "dev-z": {"balena_uuid": FIXTURE_UUID}}
    routing = router.route(
        _alert(
            alertname="NodeFilesystemAlmostOutOfSpace",
            mountpoint="/mnt/data",
            balena_uuid=FIXTURE_UUID,
        ),
        _fleet(router, hosts),
    )
    assert routing.outcome is FiringOutcome.UNRESOLVED
    assert "2 hosts" in routing.reason


def test_a_missing_device_label_is_unresolved(router: Router) -> None:
    """A matching alert without the device label is recorded unresolved with the label named."""
    routing = router.route(
        _alert(alertname="NodeFilesystemAlmostOutOfSpace", mountpoint="/mnt/data"), _fleet(router)
    )
    assert routing.outcome is FiringOutcome.UNRESOLVED
    assert "no 'balena_uuid' label" in routing.reason


def test_host_names_that_are_not_plain_are_never_routed(router: Router) -> None:
    """An inventory host name with pattern characters is not used as a limit."""
    hosts = {"dev[1:2]": {"balena_uuid": FIXTURE_UUID}}
    routing = router.route(
        _alert(
            alertname="NodeFilesystemAlmostOutOfSpace",
            mountpoint="/mnt/data",
            balena_uuid=FIXTURE_UUID,
        ),
        _fleet(router, hosts),
    )
    assert routing.outcome is FiringOutcome.UNRESOLVED
    assert "not a plain name" in routing.reason


def test_one_alert_may_start_several_runbooks(tmp_path: Path) -> None:
    """Two runbooks triggered by the same alert each get a route."""
    second = DISK_RUNBOOK.replace("name: disk-full", "name: disk-full-too")
    project = write_project(tmp_path, runbooks={"a.yml": DISK_RUNBOOK, "b.yml": second})
    router = Router(load_runbooks([project.runbooks], playbooks_dir=project.playbooks))
    routing = router.route(
        _alert(
            alertname="NodeFilesystemAlmostOutOfSpace",
            mountpoint="/mnt/data",
            balena_uuid=FIXTURE_UUID,
        ),
        _fleet(router),
    )
    assert sorted(r.runbook for r in routing.routes) == ["disk-full", "disk-full-too"]


def test_fleet_treats_a_pattern_selecting_nothing_as_empty() -> None:
    """A runbook whose group is empty has no devices; the fleet still loads."""
    fleet = load_fleet(Path("x"), [("nobody", None)], fake_resolver(FLEET), NOW)
    assert fleet.hosts["nobody"] == ()
    assert fleet.devices("nobody", None, "dev-a") == ()


def test_decisions_are_remembered_per_fleet_snapshot_only(router: Router) -> None:
    """The same routing labels get the same decision; a new inventory snapshot decides afresh."""
    labels = {
        "alertname": "NodeFilesystemAlmostOutOfSpace",
        "mountpoint": "/mnt/data",
        "balena_uuid": "b" * 32,
    }
    fleet = _fleet(router)
    first = router.route(_alert(**labels, severity="warning"), fleet)
    again = router.route(_alert(**labels, severity="critical"), fleet)  # not a routing label
    assert again is first
    moved = _fleet(router, {**FLEET, "dev-b": {"balena_uuid": "e" * 32}})
    assert router.route(_alert(**labels), moved).outcome is FiringOutcome.UNRESOLVED
    assert router.route(_alert(**labels), fleet).routes[0].host == "dev-b"


def test_decisions_differ_when_any_routing_label_differs(router: Router) -> None:
    """A remembered decision is never reused for another device or another match label."""
    base = {"alertname": "NodeFilesystemAlmostOutOfSpace", "balena_uuid": "b" * 32}
    fleet = _fleet(router)
    queued = router.route(_alert(**base, mountpoint="/mnt/data"), fleet)
    assert queued.outcome is FiringOutcome.QUEUED
    assert router.route(_alert(**base, mountpoint="/"), fleet).outcome is FiringOutcome.UNMATCHED
    other = router.route(
        _alert(**{**base, "balena_uuid": "c" * 32, "mountpoint": "/mnt/data"}), fleet
    )
    assert other.routes[0].host == "dev-c"
    missing = router.route(_alert(alertname=base["alertname"], mountpoint="/mnt/data"), fleet)
    assert missing.outcome is FiringOutcome.UNRESOLVED


def test_huge_routing_labels_are_routed_but_not_remembered(router: Router) -> None:
    """A 10 KB device label is decided every time, so hostile text cannot fill the memo."""
    hostile = "x" * 10240
    alert = _alert(
        alertname="NodeFilesystemAlmostOutOfSpace", mountpoint="/mnt/data", balena_uuid=hostile
    )
    fleet = _fleet(router)
    first = router.route(alert, fleet)
    assert first.outcome is FiringOutcome.UNRESOLVED
    assert router.route(alert, fleet) is not first


def test_explain_names_the_first_matcher_each_trigger_fails(router: Router) -> None:
    """Per runbook, explain says which matcher of which trigger failed, with both sides."""
    fleet = _fleet(router)
    explained = router.explain(
        {"alertname": "NodeFilesystemAlmostOutOfSpace", "mountpoint": "/", "job": "x"}, fleet
    )
    assert explained.routing.outcome is FiringOutcome.UNMATCHED
    by_runbook = {rb.runbook: rb for rb in explained.runbooks}
    (disk,) = by_runbook["disk-full"].triggers
    assert disk.mismatch == Mismatch(Matcher.MATCH, "mountpoint", ("/mnt/data",), "/")
    (engine,) = by_runbook["engine-down"].triggers
    assert engine.mismatch == Mismatch(
        Matcher.ALERTNAME, "alertname", ("BalenaEngineDown",), "NodeFilesystemAlmostOutOfSpace"
    )
    engine_alert = {"alertname": "BalenaEngineDown"}
    (regex,) = {rb.runbook: rb for rb in router.explain(engine_alert, fleet).runbooks}[
        "engine-down"
    ].triggers
    assert regex.mismatch == Mismatch(Matcher.MATCH_RE, "job", ("node|balena",), None)
    assert all(rb.route is None and rb.device is None for rb in explained.runbooks)


def test_explain_is_the_decision_route_makes(router: Router) -> None:
    """The routing explain returns is the one route records, for routed and refused alerts."""
    fleet = _fleet(router)
    for labels in (
        {"alertname": "NodeFilesystemAlmostOutOfSpace", "mountpoint": "/mnt/data"},
        {
            "alertname": "NodeFilesystemAlmostOutOfSpace",
            "mountpoint": "/mnt/data",
            "balena_uuid": "b" * 32,
        },
        {"alertname": "BalenaEngineDown", "job": "node", "instance": "nowhere:9100"},
        {"alertname": "Other"},
    ):
        assert router.explain(labels, fleet).routing == router.route(_alert(**labels), fleet)


def test_explain_shows_the_device_lookup_of_a_matched_trigger(router: Router) -> None:
    """A matched trigger's device lookup names the label read and the hosts it found."""
    hosts = {**FLEET, "dev-z": {"balena_uuid": FIXTURE_UUID}}
    labels = {
        "alertname": "NodeFilesystemAlmostOutOfSpace",
        "mountpoint": "/mnt/data",
        "balena_uuid": FIXTURE_UUID,
    }
    (disk,) = [
        r
        for r in router.explain(labels, _fleet(router, hosts)).runbooks
        if r.route is None and r.device is not None
    ]
    assert disk.trigger == 0
    assert disk.device is not None
    assert disk.device.label == "balena_uuid"
    assert disk.device.hosts == ("dev-a", "dev-z")
    assert disk.device.host is None
    assert "2 hosts" in disk.device.problem
    routed = {rb.runbook: rb for rb in router.explain(labels, _fleet(router)).runbooks}
    assert routed["disk-full"].device is not None
    assert routed["disk-full"].device.host == "dev-a"


LISTED_LABELS = DISK_RUNBOOK.replace(
    "device_label: balena_uuid", "device_label: [exported_instance, instance]\n    strip_port: true"
).replace("device_var: balena_uuid", "device_var: edge_id")


@pytest.mark.parametrize(
    ("labels", "host"),
    [
        ({"instance": "b1b2c3d.balena:9100"}, "dev-b"),  # scraped directly
        # through a federation or Pushgateway with honor_labels: false, the device's own
        # instance was renamed; the instance left is the intermediary's
        ({"exported_instance": "c1b2c3d.balena:9100", "instance": "federate:9090"}, "dev-c"),
    ],
)
def test_the_first_device_label_the_alert_has_names_the_device(
    tmp_path: Path, labels: dict[str, str], host: str
) -> None:
    """``device_label: [exported_instance, instance]`` reads the first label present."""
    project = write_project(tmp_path, runbooks={"disk.yml": LISTED_LABELS})
    router = Router(load_runbooks([project.runbooks], playbooks_dir=project.playbooks))
    alert = {"alertname": "NodeFilesystemSpaceFillingUp", "mountpoint": "/mnt/data", **labels}
    explained = router.explain(alert, _fleet(router))
    assert [r.host for r in explained.routing.routes] == [host]
    (disk,) = explained.runbooks
    assert disk.device is not None
    assert disk.device.label == next(iter(labels))
    none = router.explain({k: v for k, v in alert.items() if k not in labels}, _fleet(router))
    assert none.routing.outcome is FiringOutcome.UNRESOLVED
    assert "none of the labels 'exported_instance', 'instance'" in none.routing.reason
