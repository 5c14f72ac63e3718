"""Real Prometheus (Debian 2.42) and node_exporter (Debian 1.5) for the alerting tests.

Both are configured from the shipped files in ``config/prometheus/``:

* node_exporter runs in a lab device the way ``config/prometheus/node-exporter/docker-compose.yml``
  runs it on balenaOS: a container on the device's real engine, its compose service translated
  to ``balena run`` arguments (an image made of Debian's binary: no registry), listening on the
  device's own loopback address; or, where a container cannot serve (the engine itself down),
  as a process in the device's namespaces (:func:`host_node_exporter`).
* Prometheus runs the shipped ``prometheus.yml`` and rule files, rewritten only where a test
  must: the Alertmanager address, one target file per device, 1 s intervals, ``for:`` short.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from engine.lab import Device
from tests.support.ports import free_port
from tests.support.processes import start_daemon, stop_daemon
from tests.support.webhook import ROOT, wait_for

PROMETHEUS = "/usr/bin/prometheus"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
CONFIG = ROOT / "config" / "prometheus"
RULE_FILES = ("balena-rules.yml", "node-mixin-alerts.yml")
#: The tag of the node_exporter image imported into lab devices.
EXPORTER_IMAGE = "lab-test/node-exporter:1.5"
EXPORTER_CONTAINER = "lab-test-node-exporter"
#: ``for:`` of every shipped rule that has one, in the tests' copies.
SHORT_FOR = "2s"


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    return yaml


def load_yaml(path: Path) -> Any:
    """A YAML file as plain data."""
    return _yaml().load(path.read_text(encoding="utf-8"))


def dump_yaml(data: Any, path: Path) -> Path:
    """Write ``data`` as YAML to ``path`` and return it."""
    with path.open("w", encoding="utf-8") as fh:
        _yaml().dump(data, fh)
    return path


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of an exporter's ``/metrics``: (name, labels, value)."""
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# ------------------------------------------------------------------------- node_exporter


def _exporter_image_tar(path: Path) -> Path:
    """A one-layer image: Debian's node_exporter binary and the libraries ``ldd`` names."""
    ldd = subprocess.run(["ldd", NODE_EXPORTER], capture_output=True, text=True, check=True)
    libs = re.findall(r"(/\S+) \(0x", ldd.stdout)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(os.path.realpath(NODE_EXPORTER), arcname="bin/node_exporter")
        for lib in libs:
            tar.add(os.path.realpath(lib), arcname=lib.lstrip("/"))
    return path


#: What the balena Supervisor mounts for a feature label of a service.
_FEATURE_MOUNTS = {
    "io.balena.features.dbus": "/run/dbus/system_bus_socket:/host/run/dbus/system_bus_socket",
}


def compose_service() -> dict[str, Any]:
    """The shipped node_exporter compose service."""
    compose = load_yaml(CONFIG / "node-exporter" / "docker-compose.yml")
    service: dict[str, Any] = compose["services"]["node-exporter"]
    return service


def compose_run_args(service: Mapping[str, Any]) -> list[str]:
    """``balena run`` options of a compose service (the image and command excluded).

    Only the keys the shipped service uses are translated; another key fails the test, so the
    file cannot grow a setting the tests do not exercise.  balena's feature labels are the
    Supervisor's: ``io.balena.features.dbus`` becomes the bind mount the Supervisor makes of
    the host's D-Bus socket (lab devices run a D-Bus daemon).
    """
    args: list[str] = []
    for key, value in service.items():
        if key in {"image", "command", "restart"}:
            continue
        if key == "network_mode":
            args.append(f"--network={value}")
        elif key == "pid":
            args.append(f"--pid={value}")
        elif key == "cap_add":
            args += [f"--cap-add={cap}" for cap in value]
        elif key == "read_only":
            args += ["--read-only"] if value else []
        elif key == "environment":
            args += [f"--env={name}={val}" for name, val in value.items()]
        elif key == "labels":
            for label, enabled in value.items():
                assert label in _FEATURE_MOUNTS, f"teach the tests the balena label {label!r}"
                args += [f"--volume={_FEATURE_MOUNTS[label]}"] if enabled == "1" else []
        else:
            pytest.fail(f"the node_exporter compose service has {key!r}: teach the tests it")
    return args


@contextlib.contextmanager
def exporter_container(
    device: Device,
    tmp_path: Path,
    *,
    command: Sequence[str] | None = None,
    volumes: Sequence[str] = (),
    without: Sequence[str] = (),
) -> Iterator[str]:
    """node_exporter as the shipped compose service, on ``device``'s engine; yields its URL.

    ``command`` replaces the service's flags, ``without`` leaves some of its keys out;
    ``--web.listen-address`` (a port of the device's 127.0.0.1, which the host reaches through
    :meth:`Device.expose` at the device's address) is added to the flags.
    Container and image are removed afterwards.
    """
    service = {k: v for k, v in compose_service().items() if k not in without}
    port = free_port(device.address)
    flags = list(service["command"] if command is None else command)
    flags.append(f"--web.listen-address=127.0.0.1:{port}")
    tar = tmp_path / "node-exporter-image.tar"
    if not tar.exists():
        _exporter_image_tar(tar)
    _import(device, tar)
    try:
        device.balena(
            "run",
            "--detach",
            f"--name={EXPORTER_CONTAINER}",
            *compose_run_args(service),
            *(f"--volume={v}" for v in volumes),
            EXPORTER_IMAGE,
            *flags,
        )
        with device.expose(port) as address:
            url = f"http://{address}/metrics"
            wait_for(f"node_exporter in {device.name}", lambda: _answers(url), timeout=30)
            yield url
    finally:
        device.balena("rm", "--force", EXPORTER_CONTAINER, check=False)
        device.balena("rmi", EXPORTER_IMAGE, check=False)


def _import(device: Device, tar: Path) -> None:
    """``balena import`` the image tar into ``device`` as :data:`EXPORTER_IMAGE`."""
    entrypoint = 'ENTRYPOINT ["/bin/node_exporter"]'
    args = ["balena", "import", "--change", entrypoint, "-", EXPORTER_IMAGE]
    with tar.open("rb") as image:
        proc = subprocess.run(
            device.nsenter_args(args), stdin=image, capture_output=True, check=False, timeout=120
        )
    assert proc.returncode == 0, proc.stderr.decode()


@contextlib.contextmanager
def host_node_exporter(device: Device, flags: Sequence[str]) -> Iterator[str]:
    """node_exporter as a process in all of ``device``'s namespaces; yields its URL.

    For what a container on the device's engine cannot see: the engine itself going down
    takes such a container with it.  Stopped (its whole process group) afterwards.
    """
    port = free_port(device.address)
    args = [NODE_EXPORTER, *flags, f"--web.listen-address=127.0.0.1:{port}"]
    proc = subprocess.Popen(
        device.nsenter_args(args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with device.expose(port) as address:
            url = f"http://{address}/metrics"
            wait_for(f"node_exporter in {device.name}", lambda: _answers(url), timeout=30)
            yield url
    finally:
        # nsenter forks the exporter into the device's PID namespace and does not pass
        # signals on: stop the whole process group (the session started above).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------- Prometheus


def short_rules(directory: Path) -> list[Path]:
    """Copies of the shipped rule files with every ``for:`` set to :data:`SHORT_FOR`."""
    written = []
    for name in RULE_FILES:
        rules = load_yaml(CONFIG / name)
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = SHORT_FOR
        written.append(dump_yaml(rules, directory / name))
    return written


def prometheus_config(directory: Path, *, alertmanager: str, targets: Mapping[str, str]) -> Path:
    """The shipped ``prometheus.yml`` for a test: 1 s intervals, short ``for:``, these targets.

    ``targets`` maps balena UUIDs to ``address:port``; each gets the target file the shipped
    config's comments describe (named after the UUID, which its relabeling turns into the
    ``balena_uuid`` label).  Only job ``node`` is kept: the lab runs no blackbox_exporter for
    job ``balena-supervisor-health``.
    """
    config = load_yaml(CONFIG / "prometheus.yml")
    config["global"].update(
        {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    )
    config["alerting"]["alertmanagers"] = [
        {"static_configs": [{"targets": [alertmanager.removeprefix("http://")]}]}
    ]
    short_rules(directory)
    assert config["rule_files"] == list(RULE_FILES)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "node"]
    config["scrape_configs"] = [job]
    (sd,) = job["file_sd_configs"]
    (pattern,) = sd["files"]
    folder = directory / Path(pattern).parent
    folder.mkdir()
    for uuid, address in targets.items():
        dump_yaml([{"targets": [address]}], folder / f"{uuid}.yml")
    return dump_yaml(config, directory / "prometheus.yml")


@dataclass
class Prometheus:
    """A running Prometheus and its HTTP API."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def _get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        """Alerts in ``state`` (``pending`` or ``firing``), each with its labels."""
        return [a for a in self._get("/api/v1/alerts")["alerts"] if a["state"] == state]

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets, with their labels after relabeling."""
        targets: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return targets


StartPrometheus = Callable[[Path], Prometheus]


@pytest.fixture
def start_prometheus() -> Iterator[StartPrometheus]:
    """Start Prometheus on a config file (its TSDB beside it); stopped after."""
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    started: list[Prometheus] = []

    def start(config: Path) -> Prometheus:
        check = promtool("check", "config", str(config))
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={config.parent / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=debug",
        ]
        log = config.with_suffix(".log")
        prometheus = Prometheus(url=url, proc=start_daemon(argv, log, f"{url}/-/ready"), log=log)
        started.append(prometheus)
        return prometheus

    yield start
    for prometheus in started:
        stop_daemon(prometheus.proc)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``promtool`` (skipping the test when it is not installed)."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, check=False, timeout=60
    )


def data_partition_device(device: Device) -> str:
    """The block device of ``device``'s data partition, as ``/proc/mounts`` names it."""
    out = device.sh("awk '$2 == \"/mnt/data\" {print $1}' /proc/mounts").stdout.split()
    assert len(out) == 1, out
    return out[0]
