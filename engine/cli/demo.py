"""``remediate demo``: the real job on one simulated balenaOS device, from fault to audit.

As root with the lab's Debian packages, it brings up one lab device (:mod:`engine.lab`), fills
its data partition with a dangling image (``--orphan`` also leaves an orphaned layer), then
runs the very commands an operator types - ``remediate plan``, ``remediate run --apply
--yes``, ``remediate history``, ``remediate audit verify`` - in this process, through the
same entry point (:func:`engine.cli.run_cli`), against a private state dir, and tears the
device down.  Each stage is announced; the whole takes well under a minute once the lab's
image set is cached (``~/.cache/remediate-lab``, built on the first run).

Nothing is left behind, also when stopped: Ctrl-C or SIGTERM during a command stops it as it
would stop on its own (a run is recorded interrupted, exit 130 or 143), and a signal that
arrives while the device starts, a fault is injected or the teardown runs is held until that
step has ended, so a half-started device is never left running.  The state dir is a temporary
folder removed at the end unless ``--keep-state DIR`` names one: the user's ``.remediate``
gets no demo runs unless asked.

Without root or the packages it says why, in one line, and shows the localhost dry-run
instead (``remediate plan stale-probe-scratch -i inventories/localhost.yml``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engine.cli.app import EXIT_FAULT, EXIT_SIGINT, EXIT_SIGTERM, app, cli_state
from engine.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console

    from engine.lab import Device, Lab

RUNBOOK = "data-partition-full"
ORPHAN_RUNBOOK = "orphaned-layers"
#: The README's dry-run on this machine: what the demo shows where the lab cannot run.
FALLBACK = ("plan", "stale-probe-scratch", "-i", "inventories/localhost.yml")
FILL_PERCENT = 95
_STOPPED = frozenset({EXIT_SIGINT, EXIT_SIGTERM})


@app.command()
def demo(
    ctx: typer.Context,
    orphan: Annotated[
        bool,
        typer.Option(
            "--orphan", help="Also leave an orphaned layer and remove it with orphaned-layers."
        ),
    ] = False,
    keep_state: Annotated[
        Path | None,
        typer.Option(
            "--keep-state",
            help="Keep the demo's runs, audit log and artifacts in this folder "
            "[default: a temporary folder, removed at the end]",
        ),
    ] = None,
) -> None:
    """The real job on a lab device: fault, plan, fix, verify, audit (root; else a dry-run)."""
    from engine.lab import missing_requirements

    state = cli_state(ctx)
    problems = missing_requirements()
    tmp = Path(tempfile.mkdtemp(prefix="remediate-demo-"))
    try:
        show = _Demo(state.console, state.settings, keep_state or tmp / "state")
        if problems:
            code = show.fallback("; ".join(problems))
        else:
            code = show.on_a_lab_device(tmp / "lab", orphan=orphan)
    finally:
        with _HeldSignals("removing the demo's temporary files"):
            shutil.rmtree(tmp / "state", ignore_errors=True)
            with contextlib.suppress(OSError):  # kept when the lab left something behind
                tmp.rmdir()
    if code:
        raise typer.Exit(code)


class _HeldSignals:
    """SIGINT and SIGTERM noted, not acted on, while installed (from the main thread only).

    A signal the process ignores stays ignored.  The first one noted is said on stderr.
    """

    def __init__(self, why: str) -> None:
        self.received: int | None = None
        self._why = why
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _HeldSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = previous
                    signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received is None:
            sys.stderr.write(f"\ndemo: {signal.Signals(signum).name}: {self._why}\n")
            self.received = signum

    def __exit__(self, *exc: object) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Demo:
    """The stages, announced on ``console``; commands run with ``state_dir`` as their state."""

    def __init__(self, console: Console, settings: Settings, state_dir: Path) -> None:
        self.console = console
        self.settings = settings
        self.state_dir = state_dir.resolve()
        self.lab: Lab | None = None
        self._stage = 0
        self._stages = 0
        self._started = time.monotonic()

    # -- the two shows -------------------------------------------------------------------

    def fallback(self, why: str) -> int:
        """The localhost dry-run, after one line saying why there is no lab device."""
        self.say(
            f"demo: cannot bring up a lab device: {why}; showing the localhost dry-run instead"
        )
        return self.remediate(*FALLBACK)

    def on_a_lab_device(self, lab_dir: Path, *, orphan: bool) -> int:
        """Bring a device up, break it, fix it, show the records, tear it down; the exit code."""
        from engine.cli import Terminated
        from engine.runbooks import find_runbook

        runbooks, playbooks = self.settings.runbooks_dir, self.settings.playbooks_dir
        for name in (RUNBOOK, ORPHAN_RUNBOOK) if orphan else (RUNBOOK,):  # before any device
            find_runbook(name, runbooks, playbooks_dir=playbooks)
        self._stages = 8 if orphan else 7
        self.say(
            "demo: a full data partition on a simulated balenaOS device, planned, fixed, "
            "verified and audited by the real engine"
        )
        self.say(f"  every command below runs with --state-dir {self.state_dir}", style="dim")
        code = EXIT_FAULT  # unless a stage ends with a code of its own
        try:
            code = self._bring_up(lab_dir)
            if code == 0 and self.lab is not None:
                code = self._break_fix_and_show(self.lab, orphan=orphan)
        except KeyboardInterrupt:  # between two commands (a command returns 130 itself)
            code = EXIT_SIGINT
        except Terminated:
            code = EXIT_SIGTERM
        finally:  # an error (the lab failed as a tool) goes on to the CLI after this
            code = self._tear_down(lab_dir, code)
        return code

    # -- stages --------------------------------------------------------------------------

    def _bring_up(self, lab_dir: Path) -> int:
        """Start the device (kept in ``self.lab`` before any signal can intervene); exit code."""
        from engine.lab import Lab

        self.stage("Bring up a lab device: systemd, a real Docker engine, sshd on port 22222")
        with _HeldSignals("stopping once the device is up; then it is torn down") as held:
            started = time.monotonic()
            self.lab = Lab.up(lab_dir, devices=1)
        device = self.lab.devices[0]
        self.say(
            f"  {device.name} up at {device.address}:22222 in {time.monotonic() - started:.1f} s; "
            f"inventory {self.lab.inventory_path}"
        )
        return _stopped(held)

    def _break_fix_and_show(self, lab: Lab, *, orphan: bool) -> int:
        from engine.lab import faults

        device = lab.devices[0]
        inventory = str(lab.inventory_path)
        fill = f"fill /mnt/data to {FILL_PERCENT}% with a dangling image"
        self.stage(
            f"Inject faults: an orphaned layer, then {fill}"
            if orphan
            else f"Inject a fault: {fill}"
        )
        with _HeldSignals("stopping once the fault is injected; then the device is torn down") as (
            held
        ):
            if orphan:
                self.say(f"  {device.name}: " + faults.inject(device, faults.Fault.ORPHAN_LAYER))
            kind = faults.FillKind.DANGLING_IMAGE
            filled = faults.inject(device, faults.Fault.FILL, percent=FILL_PERCENT, kind=kind)
            self.say(f"  {device.name}: {filled}")
        if code := _stopped(held):
            return code
        before = self._data_use(device)

        self.stage("Plan (a dry-run: nothing changes): the exact images it would remove")
        if code := self.remediate("plan", RUNBOOK, "-i", inventory):
            return code
        self.stage("Apply the plan, then verify the fix with fresh probes")
        code = self.remediate("run", RUNBOOK, "-i", inventory, "--apply", "--yes")
        if code in _STOPPED:
            return code
        self.say(f"  {device.name}: /mnt/data {before}% used before, {self._data_use(device)}% now")
        if orphan:
            self.stage(
                "Orphaned layer: the orphaned-layers runbook (min_age=0s: this orphan is "
                "seconds old; the default 1h tells an orphan from a layer being pulled)"
            )
            again = self.remediate(
                "run", ORPHAN_RUNBOOK, "-i", inventory, "-e", "min_age=0s", "--apply", "--yes"
            )
            if again in _STOPPED:
                return again
            code = code or again
        self.stage("History: every run and host outcome is recorded")
        if (shown := self.remediate("history")) in _STOPPED:
            return shown
        self.stage("Audit log: every event hash-chained; check the chain")
        verified = self.remediate("audit", "verify")
        return verified if verified in _STOPPED else code or verified

    def _tear_down(self, lab_dir: Path, code: int) -> int:
        """Stop the device and remove the lab's files; ``code``, or a fault if anything is left."""
        self.stage("Tear down the device", last=True)
        with _HeldSignals("the teardown goes on; nothing is left behind"):
            leftovers: list[str] = []
            if self.lab is not None:
                self.lab.down()
                leftovers = self.lab.find_leftovers()
            if not leftovers:
                shutil.rmtree(lab_dir, ignore_errors=True)
        if leftovers:
            for item in leftovers:
                self.say(f"  left behind: {item}", style="red")
            return code if code in _STOPPED else EXIT_FAULT
        self.say("  nothing left behind: no device process, mount, loop device, cgroup or file")
        if code in _STOPPED:
            self.say(f"demo stopped (exit {code}); the device is gone")
        else:
            verdict = "done" if code == 0 else f"ended with exit code {code}"
            self.say(f"demo {verdict} after {time.monotonic() - self._started:.0f} s")
        return code

    # -- helpers -------------------------------------------------------------------------

    def remediate(self, *args: str) -> int:
        """Show ``remediate ARGS`` and run it here, as the CLI runs it; its exit code."""
        from engine.cli import run_cli

        self.say(f"$ remediate {' '.join(args)}", style="bold cyan")
        settings = self.settings
        return run_cli(
            [
                *("--state-dir", str(self.state_dir)),
                *("--runbooks", str(settings.runbooks_dir)),
                *("--playbooks", str(settings.playbooks_dir)),
                *args,
            ]
        )

    def stage(self, title: str, *, last: bool = False) -> None:
        """Announce the next stage (``last``: the final one, whichever came before)."""
        self._stage = self._stages if last else self._stage + 1
        self.console.print()
        self.say(f"[{self._stage}/{self._stages}] {title}", style="bold")

    def say(self, text: str, style: str | None = None) -> None:
        """One line of the demo's own (never Rich markup)."""
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def _data_use(device: Device) -> int:
        from engine.lab import faults

        return faults.data_use_percent(device)


def _stopped(held: _HeldSignals) -> int:
    """The exit code of the signal that arrived while ``held``, or 0."""
    return 128 + held.received if held.received is not None else 0
