"""``remediate route``: where alerts would go, or why not, with the shipped runbooks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer

from engine.cli import run_cli
from engine.cli.route import parse_labels
from tests.support.cli import REMEDIATE, remediate_env
from tests.support.webhook import FIXTURE_UUID, FIXTURES, ROOT, TOKEN

FIRING = FIXTURES / "firing-single.json"


@pytest.fixture(autouse=True)
def _project_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run from the project root (its runbooks) with a private state dir."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("REMEDIATE_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    """dev-a is the device of the shared fixture bodies; dev-b and dev-c share a uuid."""
    path = tmp_path / "hosts.ini"
    path.write_text(
        "[balena_fleet]\n"
        f"dev-a balena_uuid={FIXTURE_UUID}\n"
        f"dev-b balena_uuid={'b' * 32}\n"
        f"dev-c balena_uuid={'b' * 32}\n"
    )
    return path


def _json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_the_fixture_alert_goes_to_data_partition_full_on_its_device(
    inventory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real Alertmanager body: runbook, host and mode; the other runbooks say why not."""
    assert run_cli(["route", str(FIRING), "-i", str(inventory), "-o", "json"]) == 0
    (alert,) = _json(capsys)["alerts"]
    assert alert["outcome"] == "queued"
    assert alert["fingerprint"] == "65e1313268711ef4"
    assert alert["routes"] == [
        {
            "runbook": "data-partition-full",
            "host": "dev-a",
            "trigger_mode": "plan",
            "mode": "dry-run",
        }
    ]
    by_runbook = {rb["runbook"]: rb for rb in alert["runbooks"]}
    disk = by_runbook["data-partition-full"]
    assert disk["trigger"] == "triggers[1]"
    assert disk["device"] == {"label": "balena_uuid", "hosts": ["dev-a"], "problem": ""}
    engine = by_runbook["engine-unresponsive"]
    assert engine["trigger"] is None
    assert {(t["matcher"], t["actual"]) for t in engine["triggers"]} == {
        ("alertname", "NodeFilesystemAlmostOutOfSpace")
    }


def test_the_failing_matcher_is_named_with_its_trigger_and_label(
    inventory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An alert about another file system: exit 1, and which trigger refused it on which label."""
    labels = f"alertname=NodeFilesystemAlmostOutOfSpace,mountpoint=/boot,balena_uuid={FIXTURE_UUID}"
    assert run_cli(["route", "-L", labels, "-i", str(inventory)]) == 1
    out = capsys.readouterr().out
    assert "-> unmatched" in out
    assert "data-partition-full: no trigger matches" in out
    assert (
        "triggers[0]: alertname 'NodeFilesystemAlmostOutOfSpace' is not BalenaDataPartitionLowSpace"
        in out
    )
    assert (
        "triggers[1]: label mountpoint is '/boot', which does not fully match "
        "(/[^/]+)?/(mnt/data|var/lib/docker)"
    ) in out


@pytest.mark.parametrize(
    ("uuid", "problem"),
    [
        (None, "the alert has no 'balena_uuid' label"),
        ("f" * 32, "no host of 'balena_fleet' in"),
        ("b" * 32, "2 hosts of 'balena_fleet' have a host var 'balena_uuid' equal to"),
    ],
)
def test_a_matched_alert_without_exactly_one_host_says_why(
    inventory: Path, capsys: pytest.CaptureFixture[str], uuid: str | None, problem: str
) -> None:
    """Device label missing, no host, two hosts: the matched trigger and the problem are shown."""
    labels = ["alertname=BalenaDataPartitionLowSpace"]
    labels += [f"balena_uuid={uuid}"] if uuid else []
    args = ["route", "-i", str(inventory), "-o", "json"]
    assert run_cli([*args, *(a for label in labels for a in ("-L", label))]) == 1
    (alert,) = _json(capsys)["alerts"]
    assert alert["outcome"] == "unresolved"
    (disk,) = [rb for rb in alert["runbooks"] if rb["runbook"] == "data-partition-full"]
    assert disk["trigger"] == "triggers[0]"
    assert disk["route"] is None
    assert problem in disk["device"]["problem"]


def test_label_values_may_hold_commas_and_equals() -> None:
    """A comma starts a label only before name=; the Prometheus {..} form quotes anything."""
    assert parse_labels(["alertname=X,description=a, b=c,d", "job=node"]) == {
        "alertname": "X",
        "description": "a",
        "b": "c,d",
        "job": "node",
    }
    assert parse_labels(["mountpoint=/a,b/c=d"]) == {"mountpoint": "/a,b/c=d"}
    assert parse_labels(['{alertname="X", summary="a, b=\\"c\\""}']) == {
        "alertname": "X",
        "summary": 'a, b="c"',
    }
    for bad in (["alertname"], ["9x=1"], ["{alertname=X}"], ["a=1", "a=2"]):
        with pytest.raises(typer.BadParameter):
            parse_labels(bad)


def test_a_body_on_stdin_with_the_server_configuration(tmp_path: Path, inventory: Path) -> None:
    """``route - --config``: the body from stdin; inventory and runbooks from the server's file."""
    config = tmp_path / "server.yml"
    config.write_text(
        f"inventory: {inventory}\nrunbooks_dir: {ROOT / 'runbooks'}\n"
        f"playbooks_dir: {ROOT / 'playbooks'}\nauth: {{token: {TOKEN}}}\n"
    )
    config.chmod(0o600)  # it holds a token: the server refuses it readable by others
    proc = subprocess.run(
        [*REMEDIATE, "route", "-", "--config", str(config), "-o", "json"],
        input=FIRING.read_text(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=remediate_env(tmp_path / "state"),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["inventory"] == str(inventory)
    assert [r["host"] for r in report["alerts"][0]["routes"]] == ["dev-a"]


def test_a_bad_body_is_an_input_error_naming_the_field(
    tmp_path: Path, inventory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A body that is not an Alertmanager notification exits 2 naming the file and the field."""
    body = json.loads(FIRING.read_text())
    del body["alerts"][0]["startsAt"]
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    assert run_cli(["route", str(path), "-i", str(inventory)]) == 2
    assert f"{path}: alerts.0.startsAt: required field is missing" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [["route"], ["route", str(FIRING), "-L", "a=b"], ["route", str(FIRING)]],
    ids=["nothing", "both", "no-inventory"],
)
def test_usage_errors_exit_two(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Neither or both of a body and --labels, or no inventory: a usage error."""
    assert run_cli(args) == 2
    assert "Traceback" not in capsys.readouterr().err
