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

from engine.cli.render import (
    print_json,
    print_problems,
    problem_dict,
    runbook_summary,
    runbook_view,
    runbooks_table,
)
from engine.errors import EngineError, Problem, RunbookError
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


def run_cli(argv: Sequence[str]) -> int:
    """Run the CLI with ``argv``; return the exit code. Only here are errors caught broadly."""
    err = Console(stderr=True, highlight=False)
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
