#!/usr/bin/env python3
"""Engine overhead: ``remediate plan`` vs a hand-written ``ansible-playbook``, same probes.

Both sides are subprocesses started from scratch every round, so both pay interpreter and
Ansible start-up, on the same generated hosts without Python: local-connection hosts, or with
``--ssh`` hosts behind real sshd processes on loopback addresses (``fleet.py``), which charge
the controller for SSH as a fleet does.  ``--checks N`` generates a runbook of N cheap checks
(probe_cost's) instead of ``--runbook``.

* engine: ``remediate plan RUNBOOK -i INVENTORY -o json`` (state in a temporary folder).
* hand, one task (the fair comparison, and the verdict): a play with **one** ``raw`` task
  per host whose script sets the runbook's params and runs every check command of the
  runbook, one per line: the same commands on the same hosts in the same number of Ansible
  tasks, without the engine's framing (per-check timeout, base64 records), inventory
  resolution, guards, plan, state and audit.
* hand, one task per check (for reference): what a play written check by check costs.
* hand, the engine's probe script (for reference): the engine's generated script (framing
  included) in a hand-written play, which separates the cost of the framing from the cost
  of the rest of the engine (start-up, target resolution, ansible-runner, plan, audit).
* floor (for reference): a Python program that does nothing but hand the one-task play to
  ``ansible_runner.run`` (with the engine's one adjustment to it, no 0.1 s sleep when the
  pty closes).  Any engine that runs Ansible through ansible-runner, as this one must,
  pays at least this much: it shows how much of the overhead is the engine's own.

``ansible-playbook`` gets ``--forks`` equal to the engine's (50), not Ansible's default 5.
The rounds rotate the five, after a warm-up round; medians are compared.  A breakdown
then runs ``remediate plan`` through its entry point in a fresh interpreter with the
executor's calls and pexpect's spawn/close wrapped to record wall-clock marks, to show where
the difference goes (start-up, imports, runbook load, ansible-runner before and after
ansible-playbook, ansible-playbook itself, the rest, interpreter exit).

Targets: engine at most 1.15x the one-task hand-written play, and at least 3x faster than
the play with one task per check.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from fleet import add_fleet_options, fleet, write_runbook

from engine.executors.ansible import write_probe_playbook
from engine.probes import build_probe_script, probe_timeout
from engine.runbooks import Runbook, load_runbook

TARGET = 1.15
#: The engine's one framed script per host against one raw task per check: at least this fast.
PER_CHECK_TARGET = 3.0
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_RUNBOOK = ROOT / "runbooks" / "stale-probe-scratch.yml"
ANSIBLE_ENV = {
    "ANSIBLE_NOCOLOR": "True",
    "ANSIBLE_NOCOWS": "True",
    "ANSIBLE_RETRY_FILES_ENABLED": "False",
    "ANSIBLE_PIPELINING": "True",
    "ANSIBLE_SSH_USETTY": "False",
}


def param_lines(params: Mapping[str, object]) -> list[str]:
    """Shell lines exporting the runbook's params as the engine does (``$param_<name>``)."""
    lines = []
    for name, value in params.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"param_{name}={shlex.quote(text)}; export param_{name}")
    return lines


def write_hand_play(path: Path, runbook: Runbook, kind: str) -> None:
    """A hand-written probe play (``kind``: one-task, per-check, or engine-script)."""
    params = param_lines(runbook.param_values())
    checks = runbook.spec.checks
    tasks: list[dict[str, object]]
    if kind == "per-check":
        tasks = [
            {"name": c.id, "ansible.builtin.raw": "\n".join([*params, c.command])} for c in checks
        ]
    elif kind == "engine-script":  # as the engine writes it: never templated, no arg splitting
        script = build_probe_script(checks, runbook.param_values(), "@@remediate-bench")
        write_probe_playbook(path, script, timeout=probe_timeout(checks))
        return
    else:
        script = "\n".join(["set +e", *params, *(c.command for c in checks)])
        tasks = [{"name": "probe", "ansible.builtin.raw": script}]
    play = [{"name": "hand-written probe", "hosts": "all", "gather_facts": False, "tasks": tasks}]
    path.write_text(yaml.safe_dump(play, sort_keys=False, width=1000), encoding="utf-8")


def precompile_engine() -> bool:
    """Write the engine's bytecode (``__pycache__``) as installing a wheel does; whether it did.

    ``compileall`` writes even under ``PYTHONDONTWRITEBYTECODE``, which only stops the
    interpreter from writing what it compiled while importing: without this, an editable
    engine would compile its own modules at every start while Ansible's are precompiled.
    """
    return bool(compileall.compile_dir(ROOT / "engine", quiet=1))


def children_cpu() -> float:
    """User + system CPU seconds of every child process reaped so far (and their children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(
    argv: Sequence[str], env: Mapping[str, str]
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall and CPU seconds (the whole process tree) of one subprocess run, and its result."""
    cpu = children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(env), check=False)
    return time.perf_counter() - started, children_cpu() - cpu, proc


#: Runs ``remediate`` in a fresh interpreter through its console entry point (``main``, as the
#: installed script does) with wall-clock marks, printed as JSON on stderr's last line.  The
#: executor module (and with it ansible-runner and pexpect, which the command would import
#: before it starts the probe anyway) is imported first, on its own mark, so the wrappers can
#: be installed.  Wrapped: the executor's start of the probe and the collection of its result
#: (the pipeline waits there once the store, the audit log and ``run.started`` are ready),
#: and, for the breakdown of ansible-runner's share, pexpect's spawn and close (ansible-runner
#: closes the pty once ansible-playbook's output has ended).  Nothing else is changed.
_PHASES_CHILD = """
import contextlib, io, json, sys, time
marks = {}
import engine.cli
marks["imported"] = time.time()
import pexpect
from engine.executors import ansible
marks["executor imported"] = time.time()

def timed(cls, name, start, end):
    fn = getattr(cls, name)
    def wrapper(*args, **kwargs):
        marks.setdefault(start, time.time())
        try:
            return fn(*args, **kwargs)
        finally:
            marks.setdefault(end, time.time())
    setattr(cls, name, wrapper)

timed(ansible.AnsibleExecutor, "start_select_and_run_script", "probe.start", "probe.started")
timed(ansible._PendingSelection, "result", "waiting", "probe.end")
spawn_init, spawn_close = pexpect.spawn.__init__, pexpect.spawn.close
def init(self, *args, **kwargs):
    spawn_init(self, *args, **kwargs)
    marks.setdefault("spawned", time.time())
def close(self, *args, **kwargs):
    marks.setdefault("output ended", time.time())
    return spawn_close(self, *args, **kwargs)
pexpect.spawn.__init__, pexpect.spawn.close = init, close

sys.argv = ["remediate", *sys.argv[1:]]
code = 0
with contextlib.redirect_stdout(io.StringIO()):
    try:
        engine.cli.main()
    except SystemExit as exc:
        code = exc.code
marks["done"] = time.time()
sys.stderr.write("\\n" + json.dumps(marks) + "\\n")
sys.exit(code)
"""

#: ``python -c _FLOOR_CHILD PLAYBOOK INVENTORY FORKS``: the play through ansible-runner and
#: nothing else.  The engine's adjustment (engine.executors.ansible._PromptCloseSpawn) is
#: repeated here rather than imported, so the floor does not pay the engine's imports.
_FLOOR_CHILD = """
import os, shutil, sys, tempfile
import ansible_runner, ansible_runner.runner, pexpect

class Spawn(pexpect.spawn):
    def _spawnpty(self, args, **kwargs):
        pty = super()._spawnpty(args, **kwargs)
        pty.delayafterclose = 0
        return pty

ansible_runner.runner.pexpect = type(sys)("pexpect")
ansible_runner.runner.pexpect.__dict__.update(vars(pexpect), spawn=Spawn)
playbook, inventory, forks = sys.argv[1:]
private = tempfile.mkdtemp(prefix="bench-floor-")
try:
    runner = ansible_runner.run(
        private_data_dir=private, playbook=playbook, inventory=inventory, forks=int(forks),
        envvars={"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]},
        quiet=True, event_handler=lambda event: False,
    )
finally:
    shutil.rmtree(private)
sys.exit(runner.rc)
"""

#: The phases one after the other (their sum is the run), then what ran meanwhile.
PHASES = (
    ("interpreter start-up + import engine.cli", "started", "imported"),
    ("import executor, ansible-runner, pexpect", "imported", "executor imported"),
    ("settings, runbook load, probe script", "executor imported", "probe.start"),
    ("ansible-runner: until ansible-playbook runs", "probe.start", "spawned"),
    ("ansible-playbook: targets + probe", "spawned", "output ended"),
    ("ansible-runner: after the output ended", "output ended", "probe.end"),
    ("guards, plan, state, audit, JSON", "probe.end", "done"),
    ("interpreter exit", "done", "exited"),
)
OVERLAPPED = (
    (
        "while ansible-playbook runs: pipeline imports, state, audit, run.started",
        "probe.started",
        "waiting",
    ),
)


def breakdown(cli_args: Sequence[str], repeat: int, env: Mapping[str, str]) -> dict[str, float]:
    """Median seconds of each phase of ``remediate plan``, marked inside one real run."""
    samples: dict[str, list[float]] = {name: [] for name, _, _ in PHASES + OVERLAPPED}
    for _ in range(repeat):
        marks = {"started": time.time()}
        proc = subprocess.run(
            [sys.executable, "-c", _PHASES_CHILD, *cli_args],
            capture_output=True,
            text=True,
            env=dict(env),
            check=False,
        )
        marks["exited"] = time.time()
        try:
            marks.update(json.loads((proc.stderr.strip().splitlines() or [""])[-1]))
        except ValueError:
            continue  # the run failed before its marks were printed: no sample
        for name, begin, end in PHASES + OVERLAPPED:
            if begin in marks and end in marks:
                samples[name].append(marks[end] - marks[begin])

    return {name: statistics.median(s) for name, s in samples.items() if s}


ENGINE = "engine: remediate plan"
HAND = "hand: one raw task"
HAND_PER_CHECK = "hand: one raw task per check"
HAND_FRAMED = "hand: engine's probe script"
HAND_KINDS = {HAND: "one-task", HAND_PER_CHECK: "per-check", HAND_FRAMED: "engine-script"}
FLOOR = "floor: ansible-runner alone"


@dataclass
class Measured:
    """Wall times per command, the engine's host outcomes and failed runs."""

    times: dict[str, list[float]]
    cpu: dict[str, list[float]]
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


def commands_for(
    root: Path, runbook_path: Path, runbook: Runbook, inventory: Path, forks: int
) -> dict[str, list[str]]:
    """The engine's command line and the hand-written plays' (written into ``root``)."""
    commands = {
        ENGINE: [
            str(BIN / "remediate"),
            *("--state-dir", str(root / "state"), "--runbooks", str(runbook_path.parent)),
            *("--playbooks", str(runbook.playbooks_dir), "plan", str(runbook_path)),
            *("-i", str(inventory), "-o", "json"),
        ]
    }
    for name, kind in HAND_KINDS.items():
        play = root / f"hand-{kind}.yml"
        write_hand_play(play, runbook, kind)
        commands[name] = [
            str(BIN / "ansible-playbook"),
            "-i",
            str(inventory),
            "-f",
            str(forks),
            str(play),
        ]
    commands[FLOOR] = [
        sys.executable,
        *("-c", _FLOOR_CHILD, str(root / "hand-one-task.yml"), str(inventory), str(forks)),
    ]
    return commands


def measure(
    commands: Mapping[str, Sequence[str]], env: Mapping[str, str], warmup: int, repeat: int
) -> Measured:
    """Run every command once per round, rotating the order to cancel drift."""
    result = Measured(times={name: [] for name in commands}, cpu={name: [] for name in commands})
    names = list(commands)
    for round_ in range(warmup + repeat):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, cpu, proc = timed(commands[name], env)
            if round_ < warmup:
                continue
            result.times[name].append(elapsed)
            result.cpu[name].append(cpu)
            if name == ENGINE and proc.returncode in {0, 1}:
                result.outcomes.update(h["outcome"] for h in json.loads(proc.stdout)["hosts"])
            elif proc.returncode != 0:
                result.failures[name] += 1
                tail = (proc.stderr.strip().splitlines() or ["no stderr"])[-1]
                print(f"  {name} failed (rc {proc.returncode}): {tail}", file=sys.stderr)
    return result


def report(measured: Measured, parts: Mapping[str, float]) -> None:
    """Print the table, the ratios and the verdict, then the breakdown."""
    print(
        f"{'command':<30}  {'median s':>9}  {'min s':>7}  {'max s':>7}  {'CPU s':>6}  {'failed':>6}"
    )
    medians = {name: statistics.median(t) for name, t in measured.times.items()}
    cpu = {name: statistics.median(c) for name, c in measured.cpu.items()}
    for name, t in measured.times.items():
        print(
            f"{name:<30}  {medians[name]:>9.3f}  {min(t):>7.3f}  {max(t):>7.3f}  "
            f"{cpu[name]:>6.2f}  {measured.failures[name]:>6}"
        )
    print("  (CPU s: median user+system seconds of the whole process tree)")
    print(f"engine host outcomes over all rounds: {dict(measured.outcomes)}")
    engine, hand = medians[ENGINE], medians[HAND]
    ratio = engine / hand
    verdict = "ok" if ratio <= TARGET else "MISSED"
    print(
        f"ratio engine / hand (one raw task, same commands): {ratio:.2f} "
        f"(target ≤ {TARGET}): {verdict}; engine adds {engine - hand:.2f} s"
    )
    speedup = medians[HAND_PER_CHECK] / engine
    verdict = "ok" if speedup >= PER_CHECK_TARGET else "MISSED"
    print(
        f"engine faster than one raw task per check by: {speedup:.1f}x "
        f"(target ≥ {PER_CHECK_TARGET:g}x): {verdict}"
    )
    print("for reference:")
    floor = medians[FLOOR] / hand
    print(
        f"  floor / hand (ansible-runner running the hand play, no engine): {floor:.2f}; "
        f"engine / floor: {engine / medians[FLOOR]:.2f}"
    )
    print(f"  CPU engine / hand (one raw task):          {cpu[ENGINE] / cpu[HAND]:.2f}")
    print(f"  engine / hand with the engine's script:    {engine / medians[HAND_FRAMED]:.2f}")
    print(f"  engine's script / plain commands (framing): {medians[HAND_FRAMED] / hand:.2f}")
    if parts:
        print("where the engine's time goes (medians of marks inside separate runs):")
        in_turn = [name for name, _, _ in PHASES if name in parts]
        for name in in_turn:
            print(f"  {name:<44} {parts[name]:>6.3f} s")
        print(f"  {'sum':<44} {sum(parts[name] for name in in_turn):>6.3f} s")
        for name, _, _ in OVERLAPPED:
            if name in parts:
                print(f"  meanwhile, {name}: {parts[name]:.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=20, help="hosts in the inventory [20]")
    parser.add_argument("--runbook", type=Path, default=DEFAULT_RUNBOOK, help="runbook file")
    parser.add_argument(
        "--checks",
        type=int,
        help="instead of --runbook, a generated runbook of this many cheap checks (probe_cost's)",
    )
    parser.add_argument("--repeat", type=int, default=7, help="measured rounds [7]")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first [1]")
    parser.add_argument("--forks", type=int, default=50, help="ansible-playbook forks [50]")
    add_fleet_options(parser)
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip timing the engine's phases"
    )
    parser.add_argument(
        "--no-precompile",
        action="store_true",
        help="time the checkout as it is (by default the engine's bytecode is written first)",
    )
    args = parser.parse_args()
    precompiled = not args.no_precompile and precompile_engine()

    runbook_path = args.runbook.resolve()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        root = Path(tmp)
        if args.checks is not None:
            runbook_path = write_runbook(root / "project", args.checks)
        runbook = load_runbook(runbook_path)
        with fleet(root, args.hosts, ssh=args.ssh, device_tmp_parent=args.device_tmp) as (
            inventory,
            _,
            devices,
        ):
            env = {**os.environ, **ANSIBLE_ENV, "REMEDIATE_USER": "bench"}
            commands = commands_for(root, runbook_path, runbook, inventory, args.forks)
            measured = measure(commands, env, args.warmup, args.repeat)
            parts = (
                {}
                if args.no_breakdown
                else breakdown(commands[ENGINE][1:], max(3, args.repeat // 2), env)
            )
    load_after = os.getloadavg()[0]
    print(
        f"engine overhead: {runbook.name} ({len(runbook.spec.checks)} checks) on {args.hosts} "
        f"hosts, forks {args.forks}, {args.repeat} rounds "
        f"(+{args.warmup} warm-up); load average {load_before:.1f} → {load_after:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(f"  {devices}")
    if precompiled:
        print(
            "  engine bytecode written first (compileall), as a wheel install does; "
            "Ansible's is precompiled too"
        )
    elif os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        print(
            "  PYTHONDONTWRITEBYTECODE is set: an editable engine compiles its own modules at "
            "every start (installed packages, Ansible's included, have theirs precompiled)"
        )
    report(measured, parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
