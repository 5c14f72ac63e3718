"""The shipped alerting side (``config/prometheus/``) and the shipped runbooks' triggers.

Valid for Prometheus' and Alertmanager's own tools, and every alert its rules raise reaches the
runbook written for it.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.runbooks import load_runbooks
from engine.server.fleet import Fleet, load_fleet
from engine.server.routing import Router
from engine.targets import TargetSet
from tests.support.prometheus import CONFIG, RULE_FILES, load_yaml, promtool
from tests.support.webhook import FIXTURE_UUID, ROOT, fake_resolver

RULE_TESTS = ROOT / "tests" / "data" / "prometheus" / "balena-rules.test.yml"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
#: Devices of the routing tests: the uuids of the rule tests' series, and the fixtures'.
UUIDS = {
    "dev-a": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
    "dev-b": "b1b2c3d4e5f60718293a4b5c6d7e8f90",
    "dev-c": "c1b2c3d4e5f60718293a4b5c6d7e8f90",
    "dev-d": "d1b2c3d4e5f60718293a4b5c6d7e8f90",
}
assert UUIDS["dev-a"] == FIXTURE_UUID


@pytest.fixture(scope="module")
def shipped() -> tuple[Router, Fleet]:
    """The shipped runbooks' router and a fleet of the devices the tests' alerts name."""
    router = Router(load_runbooks([ROOT / "runbooks"], playbooks_dir=ROOT / "playbooks"))
    hosts = {name: {"balena_uuid": uuid} for name, uuid in UUIDS.items()}
    resolver = fake_resolver(hosts)

    def resolve(inventory: Path, pattern: str) -> TargetSet:
        del pattern  # every shipped runbook's group is the whole fleet here
        return resolver(inventory, "all")

    return router, load_fleet(Path("hosts.yml"), router.index_keys, resolve, NOW)


def _routes(shipped: tuple[Router, Fleet], labels: dict[str, str]) -> list[tuple[str, str]]:
    router, fleet = shipped
    return [(r.runbook, r.host) for r in router.explain(labels, fleet).routing.routes]


def test_the_shipped_rules_pass_promtool() -> None:
    """``promtool check rules`` accepts the balena rules and the rendered node-mixin alerts."""
    proc = promtool("check", "rules", *(str(CONFIG / name) for name in RULE_FILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_shipped_rules_raise_what_their_tests_expect() -> None:
    """``promtool test rules``: once per device, as df counts, prefixes, engine, Supervisor."""
    proc = promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_scrape_example_passes_promtool(tmp_path: Path) -> None:
    """``promtool check config`` accepts the shipped prometheus.yml with its rule files."""
    for name in ("prometheus.yml", *RULE_FILES):
        shutil.copy(CONFIG / name, tmp_path / name)
    (tmp_path / "balena-devices").mkdir()
    proc = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_alertmanager_example_passes_amtool() -> None:
    """``amtool check-config`` accepts the shipped route and receiver."""
    if shutil.which("amtool") is None:
        pytest.skip("amtool is not installed (Debian package prometheus-alertmanager)")
    proc = subprocess.run(
        ["amtool", "check-config", str(CONFIG / "alertmanager.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = load_yaml(CONFIG / "alertmanager.yml")
    (route,) = [r for r in config["route"]["routes"] if r["receiver"] == "remediate"]
    assert route["continue"] is True
    (receiver,) = [r for r in config["receivers"] if r["name"] == "remediate"]
    assert receiver["webhook_configs"][0]["send_resolved"] is True


def test_every_alert_a_shipped_trigger_names_is_raised_by_a_shipped_rule() -> None:
    """No trigger waits for an alert name that the shipped rules never raise."""
    raised = {
        rule["alert"]
        for name in RULE_FILES
        for group in load_yaml(CONFIG / name)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    router = Router(load_runbooks([ROOT / "runbooks"], playbooks_dir=ROOT / "playbooks"))
    named = {
        (rb.name, alertname)
        for rb in router.runbooks.values()
        for trigger in rb.spec.triggers
        for alertname in trigger.alertname
    }
    assert named
    assert {pair for pair in named if pair[1] not in raised} == set()


def test_every_alert_the_rule_tests_expect_reaches_its_runbook(
    shipped: tuple[Router, Fleet],
) -> None:
    """The alerts promtool saw the balena rules raise route to the runbook of their device."""
    expected = {
        "BalenaDataPartitionLowSpace": "data-partition-full",
        "BalenaEngineDown": "engine-unresponsive",
        "BalenaDataPartitionReadOnly": None,  # a person repairs the file system
        "BalenaSupervisorDown": "supervisor-unhealthy",
        "BalenaSupervisorUnhealthy": "supervisor-unhealthy",
    }
    seen = set()
    for case in load_yaml(RULE_TESTS)["tests"]:
        for check in case["alert_rule_test"]:
            for alert in check["exp_alerts"]:
                labels = {**alert["exp_labels"], "alertname": check["alertname"]}
                host = next(n for n, u in UUIDS.items() if u == labels["balena_uuid"])
                runbook = expected[check["alertname"]]
                assert _routes(shipped, labels) == ([(runbook, host)] if runbook else [])
                seen.add(check["alertname"])
    assert seen == set(expected)


#: Labels of node-mixin alerts as node_exporter 1.5 and the shipped scrape config make them.
NODE = {"job": "node", "instance": "10.240.0.17:9100", "balena_uuid": UUIDS["dev-a"]}


@pytest.mark.parametrize(
    ("labels", "runbook"),
    [
        ({"mountpoint": "/mnt/data"}, "data-partition-full"),
        ({"mountpoint": "/var/lib/docker"}, "data-partition-full"),
        ({"mountpoint": "/host/mnt/data"}, "data-partition-full"),
        ({"mountpoint": "/rootfs/var/lib/docker"}, "data-partition-full"),
        ({"mountpoint": "/"}, None),
        ({"mountpoint": "/mnt/boot"}, None),
        ({"mountpoint": "/var/lib/docker/overlay2/x/merged"}, None),
        ({"mountpoint": "/mnt/data/resin-data"}, None),
        ({"mountpoint": "/etc/hosts"}, None),  # a container's own bind mount from the partition
    ],
)
@pytest.mark.parametrize(
    "alertname", ["NodeFilesystemAlmostOutOfSpace", "NodeFilesystemSpaceFillingUp"]
)
def test_node_mixin_filesystem_alerts_reach_data_partition_full_only_for_its_mounts(
    shipped: tuple[Router, Fleet], alertname: str, labels: dict[str, str], runbook: str | None
) -> None:
    """Whatever mount point node_exporter reports the data partition under, and nothing else."""
    alert = {
        **NODE,
        "alertname": alertname,
        "device": "/dev/mmcblk0p6",
        "fstype": "ext4",
        "severity": "critical",
        **labels,
    }
    assert _routes(shipped, alert) == ([(runbook, "dev-a")] if runbook else [])


@pytest.mark.parametrize(
    ("unit", "routed"), [("balena.service", True), ("balena-supervisor.service", False)]
)
def test_a_failed_unit_reaches_engine_unresponsive_only_when_it_is_the_engine(
    shipped: tuple[Router, Fleet], unit: str, routed: bool
) -> None:
    """The node-mixin's NodeSystemdServiceFailed fires for any unit; only the engine's routes."""
    alert = {**NODE, "alertname": "NodeSystemdServiceFailed", "name": unit, "state": "failed"}
    assert (("engine-unresponsive", "dev-a") in _routes(shipped, alert)) is routed
