"""What `remediate plan` and `run --apply` keep is the owner's only and holds no secret."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from tests.support.cli import run_remediate

pytestmark = pytest.mark.integration

NO_PYTHON = "/nonexistent/python3"
SECRET = "s3cr3t-Api-Token-0123456789abcdef"  # noqa: S105 - the secret the test hunts for

#: A check that prints the secret param, and a step that echoes it as curl and shells would:
#: in a header, base64'd in a Basic header, inside JSON, on stderr; then it fails.
RUNBOOK = """\
apiVersion: remediate/v1
kind: Runbook
metadata: {name: echo-secret, title: A step that echoes its secret}
targets: {hosts: fleet}
params:
  api_token: {type: str, default: not-the-real-token-000, secret: true}
checks:
  - {id: seen, run: 'printf "%s" "$param_api_token" | wc -c', parse: int}
  - {id: echoed, run: 'echo "token=$param_api_token"', parse: str}
symptom: "checks.seen > 0"
steps:
  - id: leak
    playbook: leak.yml
    plan: "call the API"
    vars: {token: "{{ params.api_token }}"}
verify: "checks.seen == 0"
policy: {approval: never, max_hosts_pct: 100}
"""

PLAYBOOK = """\
- name: Echo the token
  hosts: all
  gather_facts: false
  tasks:
    - name: Call the API the way a careless script does
      ansible.builtin.raw: >-
        echo "Authorization: Bearer {{ token }}";
        printf 'user:%s' "{{ token }}" | base64;
        echo '{"token": "{{ token }}"}';
        echo "curl: (22) 401 for Bearer {{ token }}" >&2;
        exit 22
"""


def _project(root: Path) -> tuple[Path, Path, Path]:
    (root / "runbooks").mkdir()
    (root / "playbooks").mkdir()
    (root / "runbooks" / "echo-secret.yml").write_text(RUNBOOK)
    (root / "playbooks" / "leak.yml").write_text(PLAYBOOK)
    inventory = root / "hosts.ini"
    inventory.write_text(
        f"[fleet]\ndev-a ansible_connection=local ansible_python_interpreter={NO_PYTHON}\n"
    )
    return root / "runbooks", root / "playbooks", inventory


def _forms(secret: str) -> list[str]:
    """The secret as text, and the base64 of ``user:<secret>`` minus its edges."""
    encoded = base64.b64encode(f"user:{secret}".encode()).decode()
    return [secret, json.dumps(secret)[1:-1], encoded[8:-4]]


def _modes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root.parent)): f"{stat.S_IMODE(path.lstat().st_mode):04o}"
        for path in [root, *root.rglob("*")]
    }


def test_plan_and_apply_keep_private_files_without_the_secret(tmp_path: Path) -> None:
    """Under umask 000, every folder is 0700 and file 0600; no file holds the secret in any form."""
    runbooks, playbooks, inventory = _project(tmp_path)
    state = tmp_path / "state"
    plan_file = tmp_path / "review" / "plan.json"
    common = ["--runbooks", str(runbooks), "--playbooks", str(playbooks)]
    target = ["echo-secret", "-i", str(inventory), "-e", f"api_token={SECRET}"]

    planned = run_remediate([*common, "plan", *target, "--out", str(plan_file)], state, umask=0o000)
    assert planned.returncode == 0, planned.stderr
    ran = run_remediate([*common, "run", *target, "--apply", "--yes", "-o", "json"], state, umask=0)
    assert ran.returncode == 1, ran.stderr  # the step failed, as it should

    modes = _modes(state)
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {"0700"}, modes
    assert {m for p, m in modes.items() if not (tmp_path / p).is_dir()} == {"0600"}, modes
    assert stat.S_IMODE(plan_file.stat().st_mode) == 0o600
    kept = [p for p in state.rglob("*") if p.is_file()]
    names = {p.name for p in kept}
    assert {"audit.jsonl", "state.db", "stdout", "stderr", "command"} <= names
    assert any(p.parent.name == "job_events" for p in kept)
    for path in [*kept, plan_file]:
        data = path.read_bytes().decode("utf-8", errors="replace")
        for form in _forms(SECRET):
            assert form not in data, f"{path} holds the secret ({form!r})"
    for output in (planned.stdout, planned.stderr, ran.stdout, ran.stderr):
        assert SECRET not in output
    # Scrubbed, not missing: the echoes are there, the secret replaced.
    report = json.loads(ran.stdout)
    assert "Bearer [REDACTED]" in report["hosts"][0]["reason"]
    events = "".join(p.read_text() for p in kept if p.parent.name == "job_events")
    assert "Authorization: Bearer [REDACTED]" in events
    assert "token=[REDACTED]" in plan_file.read_text()


def test_a_loose_state_dir_is_tightened_with_one_warning(tmp_path: Path) -> None:
    """A state dir others can read is made private on start, said in one line, once."""
    state = tmp_path / "state"
    (state / "artifacts" / "run1").mkdir(parents=True)
    for folder in (state, state / "artifacts", state / "artifacts" / "run1"):
        folder.chmod(0o755)
    evidence = state / "artifacts" / "run1" / "stdout"
    evidence.write_text("device evidence\n")
    evidence.chmod(0o644)

    first = run_remediate(["history"], state)
    assert first.returncode == 0, first.stderr
    warnings = [line for line in first.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, first.stderr
    assert f"the state directory {state} (mode 0755)" in warnings[0]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(evidence.stat().st_mode) == 0o600
    again = run_remediate(["history"], state)
    assert "warning" not in again.stderr
