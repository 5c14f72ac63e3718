"""The Typer app, its shared options and the per-invocation state every command reads.

Every command pays for what the CLI imports up front, so this module and the command modules
import only Typer and the settings; each command imports the stages it uses in its body
(``remediate plan`` never loads the lab, the server or the approval code), and Rich when it
first prints (``remediate plan`` starts its probe before that).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engine.errors import ParamError
from engine.privacy import PRIVATE_UMASK
from engine.settings import Settings, load_settings

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK, EXIT_NOT_FIXED, EXIT_INPUT, EXIT_FAULT = 0, 1, 2, 3
#: Exit codes of a command stopped by SIGINT or SIGTERM (128 + the signal, as shells report).
EXIT_SIGINT, EXIT_SIGTERM = 130, 143

EPILOG = (
    "Exit codes: 0 all fixed/healthy (or valid), 1 something not fixed or failed, "
    "2 invalid input, 3 engine fault; 130 interrupted (SIGINT), 143 terminated (SIGTERM)."
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


class CliState:
    """What the root callback builds once for the commands of one invocation."""

    settings: Settings
    playbooks_explicit: bool

    @functools.cached_property
    def console(self) -> Console:
        """The command's output (stdout), made when the command first prints."""
        from rich.console import Console

        return Console(highlight=False, soft_wrap=False)


def cli_state(ctx: typer.Context) -> CliState:
    """The state the root callback built for this invocation."""
    state = ctx.obj
    if not isinstance(state, CliState):  # pragma: no cover - the callback always sets it
        raise TypeError("internal: CLI state missing")
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
    state_url: Annotated[
        str | None,
        typer.Option(
            help="State database: sqlite:///PATH or postgresql://... "
            "[env REMEDIATE_STATE_URL; STATE_DIR/state.db]"
        ),
    ] = None,
) -> None:
    """Remediation runbooks for balenaOS fleets."""
    if ctx.invoked_subcommand != "lab":
        # Whatever the commands write (state, artifacts, saved plans) is the owner's only.
        # Not for the lab: it builds root filesystems that processes in devices must read.
        os.umask(PRIVATE_UMASK)
    state = CliState()
    state.settings = load_settings(
        Path.cwd(),
        os.environ,
        runbooks_dir=runbooks,
        playbooks_dir=playbooks,
        state_dir=state_dir,
        state_url=state_url,
    )
    state.playbooks_explicit = playbooks is not None or bool(os.environ.get("REMEDIATE_PLAYBOOKS"))
    ctx.obj = state


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


def print_json(console: Console, data: Any) -> None:
    """Print machine-readable output (no Rich markup, no wrapping)."""
    console.file.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def parse_overrides(pairs: Sequence[str] | None) -> dict[str, str]:
    """``-e name=value`` pairs as a mapping; a pair without ``=`` is a ParamError."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ParamError(f"-e {pair!r}: expected name=value")
        out[name.strip()] = value
    return out
