"""The ``remediate`` command line: the edge where input is read and errors become exit codes.

Exit codes: 0 all fixed/healthy (or valid), 1 something not fixed or failed,
2 invalid input, 3 engine fault.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.text import Text

from engine.audit import AuditHead, verify_audit
from engine.cli.render import (
    history_table,
    host_records_table,
    plan_table,
    print_json,
    print_problems,
    problem_dict,
    report_view,
    runbook_summary,
    runbook_view,
    runbooks_table,
)
from engine.cli.services import open_services, open_store
from engine.errors import EngineError, InputError, ParamError, Problem, RunbookError
from engine.outcomes import Mode
from engine.pipeline import RunRequest, run_runbook
from engine.plans import Plan
from engine.runbooks import find_runbook, load_runbook, load_runbooks, runbook_files
from engine.settings import Settings, load_settings

EXIT_OK, EXIT_NOT_FIXED, EXIT_INPUT, EXIT_FAULT = 0, 1, 2, 3

EPILOG = (
    "Exit codes: 0 all fixed/healthy (or valid), 1 something not fixed or failed, "
    "2 invalid input, 3 engine fault."
)

app = typer.Typer(
    name="remediate",
    help="Find sick balenaOS devices, show what would be done, do only what guards allow.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


class Output(StrEnum):
    """Output formats."""

    TABLE = "table"
    JSON = "json"


OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for scripts")
]


class _State:
    """What the root callback builds once for the commands of one invocation."""

    settings: Settings
    console: Console
    playbooks_explicit: bool


def _state(ctx: typer.Context) -> _State:
    state = ctx.obj
    if not isinstance(state, _State):  # pragma: no cover - the callback always sets it
        raise click.UsageError("internal: CLI state missing")
    return state


@app.callback()
def _root(
    ctx: typer.Context,
    runbooks: Annotated[
        Path | None, typer.Option(help="Runbooks folder [env REMEDIATE_RUNBOOKS; ./runbooks]")
    ] = None,
    playbooks: Annotated[
        Path | None, typer.Option(help="Playbooks folder [env REMEDIATE_PLAYBOOKS; ./playbooks]")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="State, audit log, artifacts [env REMEDIATE_STATE_DIR; ./.remediate]"),
    ] = None,
) -> None:
    """Remediation runbooks for balenaOS fleets."""
    state = _State()
    state.settings = load_settings(
        Path.cwd(),
        os.environ,
        runbooks_dir=runbooks,
        playbooks_dir=playbooks,
        state_dir=state_dir,
    )
    state.console = Console(highlight=False, soft_wrap=False)
    state.playbooks_explicit = playbooks is not None or bool(os.environ.get("REMEDIATE_PLAYBOOKS"))
    ctx.obj = state


@app.command()
def validate(
    ctx: typer.Context,
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Runbook files or folders [default: runbooks/]")
    ] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Check runbooks; print every problem as file:line: field: message (exit 2 if any)."""
    state = _state(ctx)
    targets = list(paths) if paths else [state.settings.runbooks_dir]
    missing = [p for p in targets if not p.exists()]
    if missing:
        raise click.BadParameter(f"no such file or folder: {', '.join(map(str, missing))}")
    files = runbook_files(targets)
    results: list[tuple[Path, tuple[Problem, ...]]] = []
    for file in files:
        try:
            load_runbook(file, playbooks_dir=_playbooks_for(state, paths))
            results.append((file, ()))
        except RunbookError as exc:
            results.append((file, exc.problems))
    cross: Sequence[Problem] = ()
    if all(not problems for _, problems in results):
        try:
            load_runbooks(files, playbooks_dir=_playbooks_for(state, paths))
        except RunbookError as exc:  # problems across files, e.g. two runbooks, one name
            cross = exc.problems
    ok = all(not problems for _, problems in results) and not cross
    if output is Output.JSON:
        print_json(
            state.console,
            {
                "ok": ok,
                "files": [
                    {"file": str(f), "ok": not p, "problems": [problem_dict(x) for x in p]}
                    for f, p in results
                ],
                "problems": [problem_dict(x) for x in cross],
            },
        )
    else:
        for file, problems in results:
            if problems:
                print_problems(state.console, problems)
            else:
                state.console.print(f"ok  {file}")
        print_problems(state.console, cross)
        if not files:
            state.console.print("no runbook files found")
    if not files or not ok:
        raise typer.Exit(EXIT_INPUT)


def _playbooks_for(state: _State, paths: Sequence[Path] | None) -> Path | None:
    """Runbooks named on the command line find ``playbooks/`` beside their own folder."""
    return None if paths and not state.playbooks_explicit else state.settings.playbooks_dir


@app.command("list")
def list_(ctx: typer.Context, output: OutputOpt = Output.TABLE) -> None:
    """List the runbooks: name, title, severity, triggers."""
    state = _state(ctx)
    runbooks = load_runbooks(
        [state.settings.runbooks_dir], playbooks_dir=state.settings.playbooks_dir
    )
    if output is Output.JSON:
        print_json(state.console, [runbook_summary(r) for r in runbooks])
    else:
        state.console.print(runbooks_table(runbooks))


@app.command()
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Runbook name or file")],
    output: OutputOpt = Output.TABLE,
) -> None:
    """Show a runbook as an operator reads it: what it checks, guards, does and never does."""
    state = _state(ctx)
    runbook = find_runbook(
        name, state.settings.runbooks_dir, playbooks_dir=state.settings.playbooks_dir
    )
    if output is Output.JSON:
        print_json(state.console, runbook.spec.model_dump(mode="json", by_alias=True))
    else:
        state.console.print(runbook_view(runbook))


InventoryOpt = Annotated[
    Path, typer.Option("--inventory", "-i", help="Ansible inventory (INI or YAML, file or folder)")
]
LimitOpt = Annotated[
    str | None, typer.Option("--limit", "-l", help="Narrow the runbook's hosts (Ansible pattern)")
]
ExtraOpt = Annotated[
    list[str] | None,
    typer.Option("--extra", "-e", help="Override a runbook parameter: name=value (repeatable)"),
]


def _overrides(pairs: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ParamError(f"-e {pair!r}: expected name=value")
        out[name.strip()] = value
    return out


def _execute(
    ctx: typer.Context,
    runbook_name: str,
    inventory: Path,
    limit: str | None,
    extra: Sequence[str] | None,
    mode: Mode,
    output: Output,
    yes: bool,
) -> None:
    state = _state(ctx)
    settings = state.settings
    runbook = find_runbook(
        runbook_name, settings.runbooks_dir, playbooks_dir=settings.playbooks_dir
    )
    request = RunRequest(
        inventory=inventory,
        limit=limit,
        overrides=_overrides(extra),
        mode=mode,
        trigger=f"user:{settings.user}",
        user=settings.user,
    )
    err = Console(stderr=True, highlight=False)

    def approve(plan: Plan) -> bool:
        if yes:
            return True
        err.print(plan_table(plan))
        if not sys.stdin.isatty():
            err.print("approval needed: destructive steps planned; rerun with --yes to approve")
            return False
        return typer.confirm("Apply the destructive steps above?", default=False, err=True)

    with open_services(settings, reporter_console=err if output is Output.TABLE else None) as (
        services
    ):
        report = run_runbook(runbook, request, services, approve=approve)
    if output is Output.JSON:
        print_json(state.console, report.model_dump(mode="json"))
    else:
        state.console.print(report_view(report))
    if not report.ok:
        raise typer.Exit(EXIT_NOT_FIXED)


@app.command()
def plan(
    ctx: typer.Context,
    runbook: Annotated[str, typer.Argument(help="Runbook name or file")],
    inventory: InventoryOpt,
    limit: LimitOpt = None,
    extra: ExtraOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Dry-run: probe, evaluate guards and show the plan. Nothing on a device changes."""
    _execute(ctx, runbook, inventory, limit, extra, Mode.DRY_RUN, output, yes=False)


@app.command()
def run(
    ctx: typer.Context,
    runbook: Annotated[str, typer.Argument(help="Runbook name or file")],
    inventory: InventoryOpt,
    limit: LimitOpt = None,
    extra: ExtraOpt = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Act on devices (without it: a dry-run)")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Approve destructive steps without asking")
    ] = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Run a runbook: dry-run unless --apply; destructive steps ask first unless --yes."""
    mode = Mode.APPLY if apply else Mode.DRY_RUN
    _execute(ctx, runbook, inventory, limit, extra, mode, output, yes=yes)


@app.command()
def history(
    ctx: typer.Context,
    run_id: Annotated[
        str | None, typer.Argument(help="Show one run's hosts instead of the list")
    ] = None,
    runbook: Annotated[str | None, typer.Option(help="Only runs of this runbook")] = None,
    limit: Annotated[int, typer.Option("--last", help="How many runs")] = 20,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Past runs, newest first; or the hosts of one run."""
    state = _state(ctx)
    with open_store(state.settings) as store:
        if run_id is None:
            runs = store.list_runs(limit=limit, runbook=runbook)
            if output is Output.JSON:
                print_json(state.console, [r.model_dump(mode="json") for r in runs])
            else:
                state.console.print(history_table(runs))
            return
        record = store.get_run(run_id)
        if record is None:
            raise InputError(f"no run {run_id!r} in {state.settings.db_path}")
        hosts = store.host_records(run_id)
    if output is Output.JSON:
        data = record.model_dump(mode="json")
        data["hosts"] = [h.model_dump(mode="json") for h in hosts]
        print_json(state.console, data)
    else:
        state.console.print(history_table([record]))
        state.console.print(host_records_table(hosts))


audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    path: Annotated[
        Path | None, typer.Argument(help="Audit file [default: STATE_DIR/audit.jsonl]")
    ] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Check the hash chain; name the first edited, removed or reordered record (exit 1)."""
    state = _state(ctx)
    target = path or state.settings.audit_path
    expected = None
    if path is None and state.settings.db_path.exists():
        with open_store(state.settings) as store:
            head = store.audit_head()
        expected = AuditHead(seq=head[0], hash=head[1]) if head else None
    result = verify_audit(target, expected_head=expected)
    if output is Output.JSON:
        print_json(state.console, {"file": str(target), **result.model_dump(mode="json")})
    elif result.ok:
        state.console.print(f"ok: {result.records} records, chain intact ({target})")
    else:
        state.console.print(Text(f"{target}:{result.first_bad_line}: {result.reason}", style="red"))
    if not result.ok:
        raise typer.Exit(EXIT_NOT_FIXED)


def run_cli(argv: Sequence[str]) -> int:
    """Run the CLI with ``argv``; return the exit code. Only here are errors caught broadly."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        result = app(args=list(argv), prog_name="remediate", standalone_mode=False)
    except RunbookError as exc:
        print_problems(err, exc.problems)
        return exc.exit_code
    except EngineError as exc:
        err.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return EXIT_NOT_FIXED
    except click.ClickException as exc:
        exc.show()
        return EXIT_INPUT if exc.exit_code == EXIT_INPUT else exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:
        err.print(f"internal error: {type(exc).__name__}: {exc}", markup=False)
        if os.environ.get("REMEDIATE_DEBUG"):
            raise
        return EXIT_FAULT
    return result if isinstance(result, int) else EXIT_OK


def main() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(sys.argv[1:]))
