"""The shipped alerting side against real exporters, end to end.

node_exporter in lab devices, Prometheus with the shipped rules, the real Alertmanager with the
shipped route, and ``remediate serve`` with the shipped runbooks.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from ruamel.yaml import YAML

from engine.lab import Device, Lab
from engine.lab import faults as lab_faults
from engine.lab.faults import FillKind
from engine.runbooks import load_runbooks
from engine.server.fleet import Fleet, load_fleet
from engine.server.routing import Router
from engine.targets import resolve_targets
from tests.support.alertmanager import StartAlertmanager
from tests.support.lab import LabDevices
from tests.support.ports import free_port
from tests.support.prometheus import (
    Prometheus,
    StartPrometheus,
    compose_service,
    data_partition_device,
    dump_yaml,
    exporter_container,
    host_node_exporter,
    prometheus_config,
    scrape,
)
from tests.support.webhook import ROOT, TOKEN, Project, ServerProcess, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.integration]

APPROVER_TOKEN = "alice-token-0123456789abcdef"  # noqa: S105 - a test credential
DATA_ALERTS = ("BalenaDataPartitionLowSpace", "NodeFilesystemAlmostOutOfSpace")
#: Every alert the data-partition-full runbook's triggers take.
TRIGGER_ALERTS = {*DATA_ALERTS, "NodeFilesystemSpaceFillingUp"}
#: node_exporter's own default for --collector.filesystem.mount-points-exclude (Debian's build
#: also excludes /mnt, /media and /run: the exporter in the image of the shipped compose
#: service is upstream's).
UPSTREAM_EXCLUDE = (
    "--collector.filesystem.mount-points-exclude="
    "^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)"
)


def _router_and_fleet(inventory: Path) -> tuple[Router, Fleet]:
    """The shipped runbooks' router and the fleet of ``inventory``, as the server loads them."""
    router = Router(load_runbooks([ROOT / "runbooks"], playbooks_dir=ROOT / "playbooks"))
    fleet = load_fleet(inventory, router.index_keys, resolve_targets, datetime.now(UTC))
    return router, fleet


def _free_pct(dev: Device) -> int:
    res = dev.ssh("df -P /mnt/data | awk 'NR == 2 {print 100 - $5}'")
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


# ------------------------------------------------------------------ what exporters report


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        # The shipped compose service as it is (Debian's exporter: /mnt/* excluded).
        ("shipped", {"/var/lib/docker"}),
        # The same with upstream's exclusions: the partition under both of its mount points.
        ("upstream", {"/mnt/data", "/var/lib/docker"}),
        # Upstream's own container recipe, -v /:/host:ro,rslave --path.rootfs=/host.
        ("host-rootfs", {"/mnt/data", "/var/lib/docker"}),
        # The same root mount without --path.rootfs nor the host's PID namespace (the exporter
        # reads its own mount table): the prefix stays in the label.
        ("host-prefix", {"/host/mnt/data", "/host/var/lib/docker"}),
    ],
)
def test_the_data_partition_trigger_matches_what_node_exporter_reports(
    variant: str,
    expected: set[str],
    lab: Lab,
    lab_devices: LabDevices,
    tmp_path: Path,
) -> None:
    """The data-partition trigger takes exactly the partition's series, however reported."""
    (dev,) = lab_devices(1)
    shipped = list(compose_service()["command"])
    root = ("/:/host:ro,rslave",)
    command, volumes, without = {
        "shipped": (shipped, (), ()),
        "upstream": ([*shipped, UPSTREAM_EXCLUDE], (), ()),
        "host-rootfs": (["--path.rootfs=/host", UPSTREAM_EXCLUDE], root, ()),
        "host-prefix": ([UPSTREAM_EXCLUDE], root, ("pid",)),
    }[variant]
    with exporter_container(
        dev, tmp_path, command=command, volumes=volumes, without=without
    ) as url:
        samples = scrape(url)
    if variant == "shipped":  # its systemd collector reaches the host's systemd over D-Bus
        engine = {"name": "balena.service", "state": "active", "type": "notify"}
        assert ("node_systemd_unit_state", engine, 1.0) in samples
    series = [labels for name, labels, _ in samples if name == "node_filesystem_avail_bytes"]
    partition = data_partition_device(dev)
    router, fleet = _router_and_fleet(lab.write_inventory(tmp_path / "inventory.yml", [dev]))

    def routed(labels: dict[str, str]) -> bool:
        alert = {**labels, "alertname": "NodeFilesystemAlmostOutOfSpace"}
        alert["balena_uuid"] = dev.balena_uuid
        routes = router.explain(alert, fleet).routing.routes
        return [(r.runbook, r.host) for r in routes] == [("data-partition-full", dev.name)]

    matched = {s["mountpoint"] for s in series if routed(s)}
    assert matched == expected, series
    assert all(s["device"] == partition for s in series if routed(s))
    # Everything else it reports (the root file system, /tmp, the container's own /etc/hosts
    # bind mounted from the data partition) starts nothing.
    assert any(not routed(s) for s in series)


# -------------------------------------------------------------------- engine down


def test_an_engine_that_stays_down_routes_to_engine_unresponsive(
    lab: Lab,
    lab_devices: LabDevices,
    start_prometheus: StartPrometheus,
    tmp_path: Path,
) -> None:
    """Engine alerts Prometheus raises from the systemd collector go to engine-unresponsive."""
    (dev,) = lab_devices(1)
    # Not a container: one on the engine goes down with it (see config/prometheus/README.md).
    flags = [
        "--collector.disable-defaults",
        *(f for f in compose_service()["command"] if f.startswith("--collector.systemd")),
    ]
    with ExitStack() as stack:
        url = stack.enter_context(host_node_exporter(dev, flags))
        address = url.removeprefix("http://").removesuffix("/metrics")
        config = prometheus_config(
            tmp_path, alertmanager=f"127.0.0.1:{free_port()}", targets={dev.balena_uuid: address}
        )
        prometheus = start_prometheus(config)
        stack.callback(lab_faults.repair_engine, dev)
        lab_faults.break_engine(dev)

        def fired() -> bool:
            names = {a["labels"]["alertname"] for a in prometheus.alerts()}
            return {"BalenaEngineDown", "NodeSystemdServiceFailed"} <= names

        wait_for("the engine alerts to fire in Prometheus", fired, timeout=60)
        alerts = [a["labels"] for a in prometheus.alerts()]
    router, fleet = _router_and_fleet(lab.write_inventory(tmp_path / "inventory.yml", [dev]))
    engine = [
        a for a in alerts if a["alertname"] in {"BalenaEngineDown", "NodeSystemdServiceFailed"}
    ]
    for labels in engine:
        assert labels["name"] == "balena.service"
        assert labels["balena_uuid"] == dev.balena_uuid
        routes = router.explain(labels, fleet).routing.routes
        assert [(r.runbook, r.host, r.trigger_mode) for r in routes] == [
            ("engine-unresponsive", dev.name, "approve")
        ]


# -------------------------------------------------------------------- the full chain


def _copy_runbooks(target: Path) -> Path:
    """The shipped runbooks, with data-partition-full as two test copies.

    ``data-partition-full`` (the devices of group ``auto``): its triggers in ``apply`` mode and
    ``approval: never`` (an alert run has nobody to approve its destructive steps);
    ``data-partition-full-approve`` (group ``manual``): its triggers in ``approve`` mode.
    """
    shutil.copytree(ROOT / "runbooks", target)
    yaml = YAML(typ="rt")
    path = target / "data-partition-full.yml"
    for name, group, mode in (
        ("data-partition-full-approve", "manual", "approve"),
        ("data-partition-full", "auto", "apply"),
    ):
        runbook = yaml.load(path.read_text(encoding="utf-8"))
        runbook["metadata"]["name"] = name
        runbook["targets"]["hosts"] = group
        for trigger in runbook["triggers"]:
            trigger["mode"] = mode
        if mode == "apply":
            runbook["policy"]["approval"] = "never"
        with (target / f"{name}.yml").open("w", encoding="utf-8") as fh:
            yaml.dump(runbook, fh)
    return target


def _inventory(lab: Lab, auto: Device, manual: Device, path: Path) -> Path:
    """The lab's inventory with ``balena_fleet`` split into groups ``auto`` and ``manual``."""
    fleet = lab.inventory([auto, manual])["all"]["children"]["balena_fleet"]  # type: ignore[index]
    hosts = fleet.pop("hosts")
    fleet["children"] = {
        "auto": {"hosts": {auto.name: hosts[auto.name]}},
        "manual": {"hosts": {manual.name: hosts[manual.name]}},
    }
    return dump_yaml({"all": {"children": {"balena_fleet": fleet}}}, path)


def _server_config(path: Path, *, port: int, inventory: Path, runbooks: Path) -> Path:
    """The shipped example server configuration, pointed at the test's parts."""
    config = YAML(typ="safe").load((ROOT / "config" / "remediate-server.example.yml").read_text())
    config.update(
        {
            "inventory": str(inventory),
            "runbooks_dir": str(runbooks),
            "playbooks_dir": str(ROOT / "playbooks"),
        }
    )
    config["listen"]["port"] = port
    config["auth"]["token"] = TOKEN
    config["approvals"]["approvers"] = {"alice": APPROVER_TOKEN}
    written = dump_yaml(config, path)
    written.chmod(0o600)  # it holds tokens: the server refuses it readable by others
    return written


def _firings(
    server: ServerProcess, dev: Device, names: Collection[str] = DATA_ALERTS
) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = server.get("/alerts?limit=1000").json()["alerts"]
    return [
        a
        for a in alerts
        if a["labels"].get("balena_uuid") == dev.balena_uuid and a["alertname"] in names
    ]


def _items(server: ServerProcess, dev: Device) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = server.get("/queue?limit=1000").json()["items"]
    return [i for i in items if i["host"] == dev.name]


def _dangling(dev: Device) -> set[str]:
    out = dev.balena("images", "-q", "--no-trunc", "--filter", "dangling=true").stdout
    return set(out.split())


def _pending(server: ServerProcess) -> list[str]:
    """Ids of the approvals pending for the approve-mode copy."""
    records: list[dict[str, Any]] = server.get("/approvals?status=pending").json()["approvals"]
    return [r["approval_id"] for r in records if r["runbook"] == "data-partition-full-approve"]


@dataclass(frozen=True)
class Chain:
    """The running chain: the server, Prometheus, the two devices and the images that fill them."""

    server: ServerProcess
    prometheus: Prometheus
    auto: Device
    manual: Device
    images: dict[str, str]


@pytest.fixture
def chain(
    lab: Lab,
    lab_devices: LabDevices,
    start_prometheus: StartPrometheus,
    start_alertmanager: StartAlertmanager,
    server_processes: list[ServerProcess],
    tmp_path: Path,
) -> Iterator[Chain]:
    """Two full devices, their exporters, the server, Alertmanager and Prometheus, all shipped.

    ``auto`` is remediated by the apply-mode copy of data-partition-full, ``manual`` by the
    approve-mode copy.  Faults and exporters are removed afterwards.
    """
    auto, manual = devices = lab_devices(2)
    project = Project(
        root=tmp_path,
        runbooks=_copy_runbooks(tmp_path / "runbooks"),
        playbooks=ROOT / "playbooks",
        inventory=_inventory(lab, auto, manual, tmp_path / "inventory.yml"),
        state=tmp_path / "state",
    )
    port = free_port()
    config = _server_config(
        tmp_path / "server.yml", port=port, inventory=project.inventory, runbooks=project.runbooks
    )
    with ExitStack() as stack:
        for dev in devices:
            stack.callback(lab_faults.clear_all, dev)
        urls = {
            dev.balena_uuid: stack.enter_context(exporter_container(dev, tmp_path))
            for dev in devices
        }
        # Filled before Prometheus scrapes: the space is gone, not going (no predict_linear).
        with ThreadPoolExecutor(len(devices)) as pool:
            fills = pool.map(
                lambda d: lab_faults.fill_data(d, 96, FillKind.DANGLING_IMAGE), devices
            )
            images = {dev.name: fill.path for dev, fill in zip(devices, fills, strict=True)}
        assert all(_free_pct(dev) < 10 for dev in devices)
        server = ServerProcess(project, config, port)
        server_processes.append(server)
        server.start()
        manager = start_alertmanager(f"{server.url}/webhook", TOKEN, shipped=True)
        prometheus_dir = tmp_path / "prometheus"
        prometheus_dir.mkdir()
        targets = {
            u: url.removeprefix("http://").removesuffix("/metrics") for u, url in urls.items()
        }
        prometheus = start_prometheus(
            prometheus_config(prometheus_dir, alertmanager=manager.url, targets=targets)
        )
        # The shipped relabeling made the target file's name the balena_uuid label.
        wait_for(
            "both targets discovered",
            lambda: {t["labels"].get("balena_uuid") for t in prometheus.targets()} == set(urls),
            timeout=30,
        )
        yield Chain(server, prometheus, auto, manual, images)


def test_a_full_data_partition_is_freed_through_prometheus_and_alertmanager(chain: Chain) -> None:
    """Apply frees a full partition unattended, approve waits for an approver; alerts resolve."""
    server, auto, manual = chain.server, chain.auto, chain.manual
    # apply: freed with no human.
    wait_for("the auto device freed", lambda: _free_pct(auto) >= 10, timeout=120)
    assert chain.images[auto.name] not in _dangling(auto)

    # approve: a pending approval; nothing is touched until alice approves it.
    def both_recorded() -> bool:
        return {f["alertname"] for f in _firings(server, manual)} == set(DATA_ALERTS)

    wait_for("an approval pending for the manual device", lambda: bool(_pending(server)), 90)
    wait_for("both data alerts of the manual device recorded", both_recorded, timeout=60)
    assert chain.images[manual.name] in _dangling(manual)
    assert _free_pct(manual) < 10
    # One symptom, one run: of a device's two data alerts, one queued the run and the other
    # joined it; so one dry run, and one approval to decide.
    assert len(_pending(server)) == 1
    # (The runbook's other trigger, a file system filling up, may fire too: for the partition
    # it joins the run as well; for another file system it matches nothing.)
    for dev in (auto, manual):
        outcomes = [f["outcome"] for f in _firings(server, dev)]
        assert sorted(outcomes) == ["coalesced", "queued"], outcomes
        # (A filling-up alert that begins once that run has ended is a new symptom: queued.)
        routed = [f["outcome"] for f in _firings(server, dev, TRIGGER_ALERTS)]
        assert set(routed) <= {"queued", "coalesced", "unmatched"}, routed
    # The node-mixin's alert names the bind mount (Debian's exporter skips /mnt/*): the issue's
    # case, now routed.
    mounts = {
        f["labels"].get("mountpoint")
        for f in _firings(server, manual)
        if f["alertname"] == "NodeFilesystemAlmostOutOfSpace"
    }
    assert mounts == {"/var/lib/docker"}
    (approval,) = _pending(server)
    decided = httpx.post(
        f"{server.url}/approvals/{approval}/approve",
        headers={"Authorization": f"Bearer {APPROVER_TOKEN}"},
        json={"reason": "full-chain test"},
        timeout=10,
    )
    assert decided.status_code == 200, decided.text
    wait_for("the manual device freed", lambda: _free_pct(manual) >= 10, timeout=120)
    assert chain.images[manual.name] not in _dangling(manual)

    # Resolved in Prometheus, sent by Alertmanager, recorded by the server.
    def resolved(dev: Device) -> bool:
        firings = _firings(server, dev)
        return bool(firings) and all(f["status"] == "resolved" for f in firings)

    wait_for("the alerts resolved", lambda: resolved(auto) and resolved(manual), timeout=60)
    assert not [a for a in chain.prometheus.alerts() if a["labels"]["alertname"] in DATA_ALERTS]

    def approved() -> dict[str, Any]:
        record: dict[str, Any] = server.get(f"/approvals/{approval}").json()
        return record

    wait_for("the approved plan applied", lambda: approved()["status"] == "applied", timeout=60)
    assert approved()["decided_by"] == "alice"

    # One run per device for its data alerts, which both are shown on; one approval for them.
    def settled() -> bool:
        items = [i for dev in (auto, manual) for i in _items(server, dev)]
        return not {i["state"] for i in items} & {"queued", "running"}

    wait_for("the queue settled", settled, timeout=60)
    later: dict[str, list[dict[str, Any]]] = {}
    for dev, mode in ((auto, "apply"), (manual, "dry-run")):
        items = _items(server, dev)
        alerts = {f["fingerprint"]: f["alertname"] for f in _firings(server, dev)}
        assert sorted(alerts.values()) == sorted(DATA_ALERTS)
        # Both data alerts ran in one run, with any other alert of the runbook's triggers that
        # fired meanwhile.
        ran = [i for i in items if set(alerts) & {f["fingerprint"] for f in i["firings"]}]
        assert len(ran) == 1, items
        (item,) = ran
        assert (item["state"], item["mode"], item["run_status"]) == ("done", mode, "succeeded")
        assert set(alerts) <= {f["fingerprint"] for f in item["firings"]}, item
        assert {f["alertname"] for f in item["firings"]} <= TRIGGER_ALERTS, item
        # A trigger alert that only began once that run had ended (a file system still seen
        # filling up) is a new symptom and may run again; it finds the device healthy.
        later[dev.name] = [i for i in items if i is not item]
        for after in later[dev.name]:
            assert after["item_id"] > item["item_id"], items
            assert {f["alertname"] for f in after["firings"]} <= TRIGGER_ALERTS - set(DATA_ALERTS)
            assert after["state"] == "done", after
    # One approval for the symptom; (a later filling-up alert's dry run asks its own).
    approvals = [a["approval_id"] for a in server.get("/approvals").json()["approvals"]]
    assert approval in approvals
    assert len(approvals) <= 1 + len(later[manual.name]), approvals
