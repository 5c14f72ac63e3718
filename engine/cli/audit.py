"""The audit commands: verify the hash chain, export it; and the state database's schema."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from engine.cli.app import EXIT_NOT_FIXED, Output, OutputOpt, app, cli_state, print_json

if TYPE_CHECKING:
    from engine.audit import AuditHead

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
state_app = typer.Typer(help="The state database.", no_args_is_help=True)
app.add_typer(state_app, name="state")


def _head_text(head: AuditHead | None) -> str:
    return "no records" if head is None else f"head seq {head.seq} hash {head.hash}"


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    path: Annotated[
        Path | None,
        typer.Argument(
            help="Audit file (e.g. from `audit export`) [default: the state's own log: the "
            "chain in PostgreSQL, else STATE_DIR/audit.jsonl]"
        ),
    ] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Check the hash chain; name the first edited, removed or reordered record (exit 1)."""
    from rich.text import Text

    from engine.audit import AuditHead, AuditLog, verify_audit
    from engine.cli.services import open_database

    state = cli_state(ctx)
    settings = state.settings
    if path is not None:
        where, result, head = str(path), verify_audit(path), AuditLog(path).head()
    else:
        with open_database(settings, migrate=False) as database:
            sink = database.audit_log()
            if sink is not None:  # the chain is in the database, with its head row
                where, result, head = database.url, sink.verify(), sink.head()
            else:
                store = database.store()
                try:
                    saved = store.audit_head()
                finally:
                    store.close()
                expected = AuditHead(seq=saved[0], hash=saved[1]) if saved else None
                log = AuditLog(settings.audit_path)
                where, result, head = str(log.path), log.verify(expected), log.head()
    if output is Output.JSON:
        data = {"source": where, **result.model_dump(mode="json")}
        data["head"] = head.model_dump(mode="json") if result.ok and head else None
        print_json(state.console, data)
    elif result.ok:
        state.console.print(
            f"ok: {result.records} records, chain intact ({where}); {_head_text(head)}",
            markup=False,
        )
    else:
        state.console.print(Text(f"{where}:{result.first_bad_line}: {result.reason}", style="red"))
    if not result.ok:
        raise typer.Exit(EXIT_NOT_FIXED)


@audit_app.command("export")
def audit_export(
    ctx: typer.Context,
    target: Annotated[Path, typer.Argument(help="File to write (JSON lines; replaced)")],
    output: OutputOpt = Output.TABLE,
) -> None:
    """Write the audit chain as JSON lines that `remediate audit verify FILE` checks offline."""
    from engine.cli.services import audit_sink, open_database

    state = cli_state(ctx)
    with open_database(state.settings, migrate=False) as database:
        head = audit_sink(state.settings, database).export(target)
    records = 0 if head is None else head.seq
    if output is Output.JSON:
        print_json(
            state.console,
            {
                "file": str(target),
                "records": records,
                "head": None if head is None else head.model_dump(mode="json"),
            },
        )
    else:
        state.console.print(
            f"exported {records} records to {target}; {_head_text(head)}", markup=False
        )


@state_app.command("migrate")
def state_migrate(
    ctx: typer.Context,
    app_role: Annotated[
        str | None,
        typer.Option(
            help="Then grant this database role what `remediate serve` needs (rows of the "
            "state tables, INSERT only on the audit chain; no DDL)"
        ),
    ] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Bring the state database's schema up to this engine's (run as the database's owner)."""
    from engine.cli.services import open_database

    state = cli_state(ctx)
    with open_database(state.settings) as database:  # migrates it (procrastinate's schema too)
        version = database.migrate()
        if app_role is not None:
            database.grant(app_role)
        where = database.url
    if output is Output.JSON:
        print_json(
            state.console, {"database": where, "schema_version": version, "granted": app_role}
        )
    else:
        granted = f"; granted {app_role} the application's privileges" if app_role else ""
        state.console.print(f"{where}: schema version {version}{granted}", markup=False)
