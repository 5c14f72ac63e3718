"""The long-running entry points: the Alertmanager webhook server and the device lab."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.cli.app import app, cli_state
from engine.logopts import LogFormat, LogLevel


@app.command()
def serve(
    ctx: typer.Context,
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Server configuration (YAML), see docs/server.md")
    ],
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            help="stderr lines: console (for a person), json (one object a line), auto: "
            "console on a terminal, else json.",
        ),
    ] = LogFormat.AUTO,
    log_level: Annotated[
        LogLevel,
        typer.Option(
            "--log-level",
            help="Least level shown on stderr; debug adds each run's pipeline events "
            "(the audit log keeps every event whatever the level).",
        ),
    ] = LogLevel.INFO,
    access_log: Annotated[
        bool,
        typer.Option("--access-log", help="Also uvicorn's access log (a line per request)."),
    ] = False,
) -> None:
    """Receive Alertmanager webhooks and turn firing alerts into runbook runs.

    Logs to stderr: each notification (status, counts, latency), runs started and finished,
    breaker, inventory reloads, worker errors with tracebacks; never a secret.
    """
    from engine.server.serve import serve as run_server

    code = run_server(
        config,
        cli_state(ctx).settings,
        log_format=log_format,
        log_level=log_level,
        access_log=access_log,
    )
    if code:
        raise typer.Exit(code)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def lab(ctx: typer.Context) -> None:
    """Simulated balenaOS devices with a real engine (root)."""
    # The lab is its own Typer app (also `python -m engine.lab.cli`), imported only when
    # invoked: every argument after `lab` (`--help` included) goes to it, mounted as `lab` of a
    # group made like the root one, so its help and errors look as if it were registered here.
    from engine.lab.cli import app as lab_app

    group = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    group.add_typer(lab_app, name="lab", help=lab.__doc__)
    prog = ctx.find_root().info_name
    code = group(args=["lab", *ctx.args], prog_name=prog, standalone_mode=False)
    if isinstance(code, int) and code:
        raise typer.Exit(code)
