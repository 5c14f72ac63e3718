"""Commands about runbooks themselves: validate, list, show."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from engine.cli.app import EXIT_INPUT, CliState, Output, OutputOpt, app, cli_state, print_json
from engine.errors import Problem, RunbookError


@app.command()
def validate(
    ctx: typer.Context,
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Runbook files or folders [default: runbooks/]")
    ] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Check runbooks; print every problem as file:line: field: message (exit 2 if any)."""
    from engine.cli.render import print_problems, problem_dict
    from engine.runbooks import load_runbook, load_runbooks, runbook_files

    state = cli_state(ctx)
    targets = list(paths) if paths else [state.settings.runbooks_dir]
    missing = [p for p in targets if not p.exists()]
    if missing:
        raise typer.BadParameter(f"no such file or folder: {', '.join(map(str, missing))}")
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


def _playbooks_for(state: CliState, paths: Sequence[Path] | None) -> Path | None:
    """Runbooks named on the command line find ``playbooks/`` beside their own folder."""
    return None if paths and not state.playbooks_explicit else state.settings.playbooks_dir


@app.command("list")
def list_(
    ctx: typer.Context,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every trigger's alert names, titles unabridged")
    ] = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """List the runbooks: name, severity, steps, triggers, title."""
    from engine.cli.render import runbook_summary, runbooks_table
    from engine.runbooks import load_runbooks

    state = cli_state(ctx)
    runbooks = load_runbooks(
        [state.settings.runbooks_dir], playbooks_dir=state.settings.playbooks_dir
    )
    if output is Output.JSON:
        print_json(state.console, [runbook_summary(r) for r in runbooks])
    else:
        state.console.print(runbooks_table(runbooks, wide=wide, width=state.console.width))


@app.command()
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Runbook name or file")],
    output: OutputOpt = Output.TABLE,
) -> None:
    """Show a runbook as an operator reads it: what it checks, guards, does and never does."""
    from engine.cli.render import runbook_view
    from engine.runbooks import find_runbook

    state = cli_state(ctx)
    runbook = find_runbook(
        name, state.settings.runbooks_dir, playbooks_dir=state.settings.playbooks_dir
    )
    if output is Output.JSON:
        print_json(state.console, runbook.spec.model_dump(mode="json", by_alias=True))
    else:
        state.console.print(runbook_view(runbook))
