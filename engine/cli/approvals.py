"""Approvals of saved plans: list, show, approve (then apply exactly that plan), deny."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from engine.cli.app import EXIT_NOT_FIXED, Output, OutputOpt, app, cli_state, print_json
from engine.cli.runs import PlanFormat, PlanFormatOpt

if TYPE_CHECKING:
    from rich.table import Table

    from engine.state import ApprovalRecord

approvals_app = typer.Typer(
    help="Saved plans waiting for a person's decision.", no_args_is_help=True
)
app.add_typer(approvals_app, name="approvals")

IdArg = Annotated[str, typer.Argument(help="Approval id (ap-...)")]


def _table(records: list[ApprovalRecord], *, wide: bool = False, width: int = 80) -> Table:
    from rich.table import Table
    from rich.text import Text

    from engine.cli.render import compact_table, compact_time

    def hosts(record: ApprovalRecord) -> Text:
        planned = [h["host"] for h in record.plan["plan"]["hosts"] if h["outcome"] == "planned"]
        return Text(", ".join(planned))

    if not wide:
        return compact_table(
            "Approvals (times UTC)",
            ("id", "runbook", "hosts", "expires", "status", "decided by"),
            [
                (
                    r.approval_id,
                    Text(r.runbook),
                    hosts(r),
                    compact_time(r.expires_at),
                    r.status.value,
                    Text(r.decided_by or ""),
                )
                for r in records
            ],
            width=width,
            shorten=("runbook", "hosts", "decided by"),
        )
    table = Table(title="Approvals", title_justify="left")
    for column in ("id", "runbook", "hosts", "requested by", "expires", "status", "decided by"):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(
            record.approval_id,
            Text(record.runbook),
            hosts(record),
            Text(record.requested_by),
            f"{record.expires_at:%Y-%m-%d %H:%M} UTC",
            record.status.value,
            Text(record.decided_by or ""),
        )
    return table


@approvals_app.command("list")
def list_approvals(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Include decided approvals")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Also who asked; full times (wider than 80)")
    ] = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Pending approvals (expired ones are closed first)."""
    from engine.approvals import expire_approvals
    from engine.audit import utc_now
    from engine.cli.services import open_services
    from engine.state import ApprovalStatus

    state = cli_state(ctx)
    with open_services(state.settings, reporter_console=None) as services:
        expire_approvals(services.store, utc_now())
        records = services.store.list_approvals(None if all_ else ApprovalStatus.PENDING)
    if output is Output.JSON:
        print_json(state.console, [r.model_dump(mode="json", exclude={"plan"}) for r in records])
    else:
        state.console.print(_table(records, wide=wide, width=state.console.width))


@approvals_app.command("show")
def show_approval(
    ctx: typer.Context, approval_id: IdArg, output: PlanFormatOpt = PlanFormat.TABLE
) -> None:
    """One approval with its plan."""
    from engine.approvals import saved_plan
    from engine.cli.render import plan_table
    from engine.cli.services import open_store
    from engine.planfiles import render_markdown

    state = cli_state(ctx)
    with open_store(state.settings) as store:
        record = store.get_approval(approval_id)
    if record is None:
        raise typer.BadParameter(f"no approval {approval_id!r}", param_hint="ID")
    saved = saved_plan(record)
    if output is PlanFormat.JSON:
        print_json(state.console, record.model_dump(mode="json"))
    elif output is PlanFormat.MARKDOWN:
        state.console.file.write(render_markdown(saved))
    else:
        state.console.print(_table([record]))
        state.console.print(plan_table(saved.plan))


@approvals_app.command("approve")
def approve_approval(
    ctx: typer.Context, approval_id: IdArg, output: OutputOpt = Output.TABLE
) -> None:
    """Approve as the current user, then apply exactly the approved plan (drift-checked)."""
    from engine.approvals import apply_approved, decide
    from engine.audit import utc_now
    from engine.cli.render import report_view
    from engine.cli.services import open_services
    from engine.runbooks import find_runbook

    state = cli_state(ctx)
    settings = state.settings
    with open_services(settings, reporter_console=None) as services:
        record = services.store.get_approval(approval_id)
        runbook = find_runbook(
            record.runbook if record else "?",
            settings.runbooks_dir,
            playbooks_dir=settings.playbooks_dir,
        )
        record = decide(
            services.store,
            approval_id,
            approver=settings.user,
            approve=True,
            now=utc_now(),
            claim=True,
        )
        report = apply_approved(services.store, record, runbook, services, now=utc_now())
    if output is Output.JSON:
        print_json(state.console, report.model_dump(mode="json"))
    else:
        state.console.print(report_view(report))
    if not report.ok:
        raise typer.Exit(EXIT_NOT_FIXED)


@approvals_app.command("deny")
def deny_approval(
    ctx: typer.Context,
    approval_id: IdArg,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log)")] = "",
) -> None:
    """Deny as the current user; the plan will never act."""
    from engine.approvals import decide
    from engine.audit import utc_now
    from engine.cli.services import open_services

    state = cli_state(ctx)
    with open_services(state.settings, reporter_console=None) as services:
        record = decide(
            services.store,
            approval_id,
            approver=state.settings.user,
            approve=False,
            now=utc_now(),
            reason=reason,
        )
    state.console.print(f"{record.approval_id} denied by {record.decided_by}", markup=False)
