"""Loading runbooks: the real ones, the valid base, and the corpus of broken runbooks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from ruamel.yaml import YAML

from engine.errors import ParamError, RunbookError
from engine.runbooks import Runbook, load_runbook, load_runbooks, runbook_files
from engine.runbooks.spec import ExprGuard, TriggerMode
from engine.schema import SCHEMA_PATH

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
CORPUS = sorted((DATA / "invalid").glob("*.yml"))


def _expectation(path: Path) -> tuple[int, str, str]:
    """The line marked ``#!error`` and the field/message named in the header."""
    text = path.read_text(encoding="utf-8")
    field = re.search(r"^# expect-field: ?(.*)$", text, re.M)
    message = re.search(r"^# expect-message: ?(.*)$", text, re.M)
    assert field is not None, f"{path} lacks its expect-field header"
    assert message is not None, f"{path} lacks its expect-message header"
    lines = text.splitlines()
    marked = [i + 1 for i, line in enumerate(lines) if "#!error" in line]
    assert len(marked) == 1, f"{path} must mark exactly one line with #!error"
    return marked[0], field.group(1).strip(), message.group(1).strip()


def test_every_bundled_runbook_loads() -> None:
    """Every file under runbooks/ loads with the project's playbooks."""
    runbooks = load_runbooks([ROOT / "runbooks"], playbooks_dir=ROOT / "playbooks")
    assert runbooks
    assert len({r.name for r in runbooks}) == len(runbooks)


def test_valid_base_loads_with_compiled_expressions() -> None:
    """The corpus base loads and its compiled expressions evaluate."""
    runbook = load_runbook(DATA / "valid" / "base.yml")
    assert runbook.name == "corpus-base"
    assert len(runbook.digest) == 64
    context = {"checks": {"free_pct": 5, "rw": True}, "params": runbook.param_values(), "host": {}}
    assert runbook.symptom.test(context) is True
    assert runbook.param_values()["min_age"] == 3600


def test_corpus_is_large_enough() -> None:
    """The broken-runbook corpus holds at least 25 cases."""
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_broken_runbook_names_file_line_and_field(path: Path) -> None:
    """Each broken runbook fails with a problem at the marked line and the expected field."""
    line, field, message = _expectation(path)
    with pytest.raises(RunbookError) as caught:
        load_runbook(path, playbooks_dir=DATA / "playbooks")
    problems = caught.value.problems
    assert all(p.file == str(path) for p in problems)
    matching = [p for p in problems if p.line == line and p.field == field]
    assert matching, f"expected {line}: {field}, got {[str(p) for p in problems]}"
    assert any(message.lower() in p.message.lower() for p in matching), [str(p) for p in problems]


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    """Several independent mistakes come back together, sorted by line."""
    text = (DATA / "valid" / "base.yml").read_text(encoding="utf-8")
    text = text.replace("symptom: checks.free_pct", "symptom: checks.nope").replace(
        "playbook: noop.yml", "playbook: gone.yml"
    )
    path = tmp_path / "multi.yml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RunbookError) as caught:
        load_runbook(path, playbooks_dir=DATA / "playbooks")
    fields = [p.field for p in caught.value.problems]
    assert fields == ["symptom", "steps[0].playbook"]


def test_duplicate_runbook_names_across_files(tmp_path: Path) -> None:
    """Two files declaring one runbook name are an error naming both."""
    for name in ("a.yml", "b.yml"):
        (tmp_path / name).write_text((DATA / "valid" / "base.yml").read_text(encoding="utf-8"))
    with pytest.raises(RunbookError) as caught:
        load_runbooks([tmp_path], playbooks_dir=DATA / "playbooks")
    (problem,) = caught.value.problems
    assert problem.field == "metadata.name"
    assert "a.yml" in problem.message
    assert problem.file.endswith("b.yml")


def test_unreadable_file_is_a_runbook_error(tmp_path: Path) -> None:
    """A missing file is reported as a problem, not an OSError."""
    with pytest.raises(RunbookError, match="cannot read"):
        load_runbook(tmp_path / "nope.yml")


def test_param_overrides_are_typed() -> None:
    """``-e`` overrides convert to the declared type; unknown names and bad values fail."""
    runbook = load_runbook(DATA / "valid" / "base.yml")
    assert runbook.param_values({"free_pct_min": "25", "min_age": "2h"}) == {
        "free_pct_min": 25,
        "min_age": 7200,
    }
    assert runbook.param_values({"min_age": "0"})["min_age"] == 0  # plain seconds
    assert runbook.param_values({"min_age": "90"})["min_age"] == 90
    with pytest.raises(ParamError, match="no parameter 'nope'"):
        runbook.param_values({"nope": "1"})
    with pytest.raises(ParamError, match="expected an int"):
        runbook.param_values({"free_pct_min": "lots"})


def test_runbook_files_expands_folders(tmp_path: Path) -> None:
    """A folder stands for its .yml/.yaml files, sorted; other files are ignored."""
    for name in ("b.yaml", "a.yml", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in runbook_files([tmp_path])] == ["a.yml", "b.yaml"]


def test_run_file_is_inlined_and_part_of_the_digest(tmp_path: Path) -> None:
    """A check's run_file script is inlined; changing the script changes the runbook digest."""
    books = tmp_path / "runbooks"
    (books / "checks").mkdir(parents=True)
    script = books / "checks" / "count.sh"
    script.write_text("echo 7\n")
    text = (DATA / "valid" / "base.yml").read_text(encoding="utf-8")
    text = text.replace('run: "echo true"', "run_file: checks/count.sh")
    path = books / "base.yml"
    path.write_text(text)
    first = load_runbook(path, playbooks_dir=DATA / "playbooks")
    assert first.spec.checks[1].command == "echo 7\n"
    script.write_text("echo 8\n")
    second = load_runbook(path, playbooks_dir=DATA / "playbooks")
    assert second.digest != first.digest
    script.unlink()
    with pytest.raises(RunbookError, match=r"checks\[1\]\.run_file: cannot read"):
        load_runbook(path, playbooks_dir=DATA / "playbooks")


def test_runbooks_validate_against_the_committed_json_schema() -> None:
    """The JSON Schema editors use accepts every bundled runbook and both spellings of lists."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = Draft202012Validator(schema)
    files = [*runbook_files([ROOT / "runbooks"]), DATA / "valid" / "base.yml"]
    safe = YAML(typ="safe", pure=True)
    for path in files:
        errors = [e.message for e in validator.iter_errors(safe.load(path.read_text()))]
        assert not errors, (path, errors)
    base = safe.load((DATA / "valid" / "base.yml").read_text())
    for alertname, device_label in (("DiskFull", "instance"), (["A", "B"], ["a", "b"])):
        base["triggers"][0].update(alertname=alertname, device_label=device_label)
        assert not list(validator.iter_errors(base))
    base["triggers"][0]["device_label"] = ["bad-name"]
    assert list(validator.iter_errors(base))


#: Bundled runbooks whose steps write to the data partition (/mnt/data, /var/lib/docker), or
#: restart something that does.
DATA_WRITERS = {
    "data-partition-full",
    "engine-unresponsive",
    "orphaned-layers",
    "supervisor-unhealthy",
}


def _guard(runbook: Runbook, guard_id: str) -> ExprGuard | None:
    return next(
        (g for g in runbook.spec.guards if isinstance(g, ExprGuard) and g.id == guard_id), None
    )


def _check_script(runbook: Runbook, check_id: str) -> str | None:
    return next((c.run_file for c in runbook.spec.checks if c.id == check_id), None)


def test_every_bundled_runbook_refuses_during_an_os_update() -> None:
    """Each bundled runbook acts on devices, so each has the shared os_update check and guard."""
    for runbook in load_runbooks([ROOT / "runbooks"], playbooks_dir=ROOT / "playbooks"):
        guard = _guard(runbook, "os_update")
        assert guard is not None, runbook.name
        assert guard.expr == "checks.os_update | length == 0", runbook.name
        assert _check_script(runbook, "os_update") == "checks/os-update.sh", runbook.name


def test_runbooks_writing_to_the_data_partition_refuse_when_it_cannot_be_written() -> None:
    """Runbooks that write to /mnt/data have the shared data_rw check and guard."""
    runbooks = {
        r.name: r for r in load_runbooks([ROOT / "runbooks"], playbooks_dir=ROOT / "playbooks")
    }
    for name in DATA_WRITERS:
        guard = _guard(runbooks[name], "data_rw")
        assert guard is not None, name
        assert guard.expr == "checks.data_rw.writable", name
        assert "repair the file system" in guard.message, name
        assert _check_script(runbooks[name], "data_rw") == "checks/data-rw.sh", name


def test_example_supervisor_alerts_start_the_supervisor_runbook() -> None:
    """The example Prometheus rules' balena-supervisor group fires what the runbook triggers on."""
    rules = yaml.safe_load((ROOT / "config" / "prometheus" / "balena-rules.yml").read_text())
    (group,) = [g for g in rules["groups"] if g["name"] == "balena-supervisor"]
    runbook = load_runbook(ROOT / "runbooks" / "supervisor-unhealthy.yml")
    (trigger,) = runbook.spec.triggers
    assert {rule["alert"] for rule in group["rules"]} == set(trigger.alertname)
    assert (trigger.device_label, trigger.device_var, trigger.mode) == (
        ("balena_uuid",),
        "balena_uuid",
        TriggerMode.APPROVE,
    )
