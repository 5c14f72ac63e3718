"""The audit command: verify the hash chain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.cli.app import EXIT_NOT_FIXED, Output, OutputOpt, app, cli_state, print_json

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
    from rich.text import Text

    from engine.audit import AuditHead, verify_audit
    from engine.cli.services import open_store

    state = cli_state(ctx)
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
