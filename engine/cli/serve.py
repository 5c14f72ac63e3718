"""The long-running entry points: the Alertmanager webhook server and the device lab."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.cli.app import app, cli_state
from engine.lab.cli import app as lab_app

app.add_typer(lab_app, name="lab", help="Simulated balenaOS devices with a real engine (root).")


@app.command()
def serve(
    ctx: typer.Context,
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Server configuration (YAML), see docs/server.md")
    ],
) -> None:
    """Receive Alertmanager webhooks and turn firing alerts into runbook runs."""
    from engine.server.serve import serve as run_server  # noqa: PLC0415 - server deps load here

    code = run_server(config, cli_state(ctx).settings)
    if code:
        raise typer.Exit(code)
