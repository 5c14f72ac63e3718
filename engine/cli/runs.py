"""Commands that run runbooks and look back at runs: plan, run, apply, show-plan, history."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from engine.cli.app import (
    EXIT_NOT_FIXED,
    CliState,
    ExtraOpt,
    InventoryOpt,
    LimitOpt,
    Output,
    OutputOpt,
    app,
    cli_state,
    parse_overrides,
    print_json,
)
from engine.errors import InputError
from engine.outcomes import Mode, RunStatus

if TYPE_CHECKING:
    from datetime import timedelta

    from rich.console import Console

    from engine.executors.ansible import AnsibleExecutor
    from engine.pipeline import RunReport, RunRequest
    from engine.plans import Plan
    from engine.probes import PendingProbe
    from engine.runbooks import Runbook
    from engine.settings import Settings
    from engine.state import RunRecord, StateStore


class PlanFormat(StrEnum):
    """How a plan is shown."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"


DistributedOpt = Annotated[
    bool,
    typer.Option(
        "--distributed",
        help="Enqueue the run for `remediate worker` processes and follow it "
        "(needs --state-url postgresql://...)",
    ),
]
ShardSizeOpt = Annotated[
    int, typer.Option("--shard-size", min=1, help="Hosts per shard of a distributed run")
]

PlanFormatOpt = Annotated[
    PlanFormat,
    typer.Option("--format", "--output", "-o", help="table, json, or a markdown review document"),
]


def _stderr(*, soft_wrap: bool = True) -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=soft_wrap)


def _approver(yes: bool) -> Callable[[Plan], bool]:
    def approve(plan: Plan) -> bool:
        if yes:
            return True
        from engine.cli.render import plan_table

        err = _stderr()
        err.print(plan_table(plan))
        if not sys.stdin.isatty():
            err.print("approval needed: destructive steps planned; rerun with --yes to approve")
            return False
        return typer.confirm("Apply the steps above?", default=False, err=True)

    return approve


def _progress_console(show: bool) -> Console | None:
    return _stderr(soft_wrap=False) if show else None


def _show_report(state: CliState, report: RunReport, output: Output | PlanFormat) -> None:
    if output.value == "json":
        print_json(state.console, report.model_dump(mode="json"))
    else:
        from engine.cli.render import report_view

        state.console.print(report_view(report))
    if not report.ok:
        raise typer.Exit(EXIT_NOT_FIXED)


def _request(
    state: CliState, inventory: Path, limit: str | None, overrides: dict[str, str], mode: Mode
) -> RunRequest:
    from engine.pipeline import RunRequest

    user = state.settings.user
    return RunRequest(
        inventory=inventory,
        limit=limit,
        overrides=overrides,
        mode=mode,
        trigger=f"user:{user}",
        user=user,
    )


def _start_first_probe(
    settings: Settings,
    runbook: Runbook,
    inventory: Path,
    limit: str | None,
    overrides: dict[str, str],
) -> tuple[AnsibleExecutor, PendingProbe]:
    """Start the run's targets and first probe now; the pipeline collects them.

    ansible-playbook then starts up while this process imports and opens the state store
    and the audit log.  A bad ``-e`` fails here, before anything runs or is recorded.
    """
    from engine.cli.services import new_executor
    from engine.probes import start_probe
    from engine.targets import runbook_selection

    params = runbook.param_values(overrides)
    executor = new_executor(settings)
    selection = runbook_selection(runbook, inventory, limit)
    return executor, start_probe(executor, selection, runbook.spec.checks, params)


def _plan_here(
    state: CliState,
    settings: Settings,
    found: Runbook,
    inventory: Path,
    limit: str | None,
    overrides: dict[str, str],
    output: PlanFormat,
    request_approval: bool,
    expires_in: timedelta,
) -> RunReport:
    """The dry-run in this process (targets and first probe started before the store opens)."""
    from engine.cli.services import open_services

    executor, first_probe = _start_first_probe(settings, found, inventory, limit, overrides)
    # ansible-playbook runs: the pipeline is imported (and the store opened) meanwhile.
    from engine.pipeline import run_runbook

    with (
        first_probe,
        open_services(
            settings,
            reporter_console=_progress_console(output is PlanFormat.TABLE),
            executor=executor,
        ) as services,
    ):
        request = _request(state, inventory, limit, overrides, Mode.DRY_RUN)
        report = run_runbook(
            found, request, services, approve=lambda _plan: False, first_probe=first_probe
        )
        if request_approval:
            _keep_for_approval(services.store, settings, report, found, expires_in)
    return report


def _request_approval_of(
    settings: Settings, report: RunReport, found: Runbook, expires_in: timedelta
) -> None:
    from engine.cli.services import open_store

    with open_store(settings) as store:
        _keep_for_approval(store, settings, report, found, expires_in)


def _keep_for_approval(
    store: StateStore, settings: Settings, report: RunReport, found: Runbook, expires_in: timedelta
) -> None:
    """Keep the plan as a pending approval, if it acts on anything."""
    if not report.plan.acting or report.plan.refused:
        return
    from engine.approvals import request_approval as request_approval_for
    from engine.audit import utc_now
    from engine.planfiles import seal_plan

    expiry = report.plan.created_at + expires_in
    pending = seal_plan(report.plan, expiry, settings.secrets)
    record = request_approval_for(
        store, pending, found, source=f"user:{settings.user}", now=utc_now()
    )
    _stderr().print(
        f"approval {record.approval_id} requested; decide with "
        f"`remediate approvals approve|deny {record.approval_id}`",
        markup=False,
    )


@app.command()
def plan(
    ctx: typer.Context,
    runbook: Annotated[str, typer.Argument(help="Runbook name or file")],
    inventory: InventoryOpt,
    limit: LimitOpt = None,
    extra: ExtraOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Save the plan for review and `remediate apply`")
    ] = None,
    expires: Annotated[
        str, typer.Option(help="How long a saved plan stays applicable (e.g. 30m, 4h)")
    ] = "4h",
    request_approval: Annotated[
        bool,
        typer.Option(
            "--request-approval", help="Keep the plan as a pending approval (remediate approvals)"
        ),
    ] = False,
    output: PlanFormatOpt = PlanFormat.TABLE,
    distributed: DistributedOpt = False,
    shard_size: ShardSizeOpt = 250,
) -> None:
    """Dry-run: probe, evaluate guards and show the plan. Nothing on a device changes."""
    from engine.cli.services import with_inventory_secrets
    from engine.durations import parse_duration
    from engine.runbooks import find_runbook

    state = cli_state(ctx)
    settings = with_inventory_secrets(state.settings, inventory)
    try:
        expires_in = parse_duration(expires)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from exc
    found = find_runbook(runbook, settings.runbooks_dir, playbooks_dir=settings.playbooks_dir)
    overrides = parse_overrides(extra)
    if distributed:
        from engine.cli.distributed import run_distributed

        request = _request(state, inventory, limit, overrides, Mode.DRY_RUN)
        with run_distributed(
            settings,
            found,
            request,
            approved=False,
            shard_size=shard_size,
            console=_progress_console(output is PlanFormat.TABLE),
        ) as followed:
            if request_approval:
                _request_approval_of(settings, followed.whole(), found, expires_in)
            if output is PlanFormat.JSON:  # a fleet's plan is written a page at a time
                if out is not None:
                    digest, expires_at = followed.save_plan(out, expires_in=expires_in)
                    _saved(out, digest, expires_at)
                followed.write_json(state.console.file)
                if not followed.ok:
                    raise typer.Exit(EXIT_NOT_FIXED)
                return
            _show_plan(state, settings, followed.whole(), output, out, expires_in)
        return
    report = _plan_here(
        state,
        settings,
        found,
        inventory,
        limit,
        overrides,
        output,
        request_approval,
        expires_in,
    )
    _show_plan(state, settings, report, output, out, expires_in)


def _show_plan(
    state: CliState,
    settings: Settings,
    report: RunReport,
    output: PlanFormat,
    out: Path | None,
    expires_in: timedelta,
) -> None:
    """Save the plan (``--out``) and show it as ``output`` asks."""
    if out is not None:
        from engine.planfiles import save_plan

        saved = save_plan(report.plan, out, expires_in=expires_in, secrets=settings.secrets)
        _saved(out, saved.digest, saved.expires_at)
    if output is PlanFormat.MARKDOWN:
        from engine.planfiles import render_markdown, seal_plan

        sealed = seal_plan(report.plan, report.plan.created_at + expires_in, settings.secrets)
        state.console.file.write(render_markdown(sealed))
        if not report.ok:
            raise typer.Exit(EXIT_NOT_FIXED)
        return
    _show_report(state, report, output)


def _saved(out: Path, digest: str, expires_at: datetime) -> None:
    from rich.console import Console

    Console(stderr=True).print(
        f"plan saved to {out} (digest {digest[:12]}, expires {expires_at:%Y-%m-%d %H:%M} UTC)",
        markup=False,
    )


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
        bool, typer.Option("--yes", "-y", help="Approve steps that need approval without asking")
    ] = False,
    output: OutputOpt = Output.TABLE,
    distributed: DistributedOpt = False,
    shard_size: ShardSizeOpt = 250,
) -> None:
    """Run a runbook: dry-run unless --apply; destructive steps ask first unless --yes."""
    from engine.cli.services import open_services, with_inventory_secrets
    from engine.runbooks import find_runbook

    state = cli_state(ctx)
    settings = with_inventory_secrets(state.settings, inventory)
    found = find_runbook(runbook, settings.runbooks_dir, playbooks_dir=settings.playbooks_dir)
    overrides = parse_overrides(extra)
    if distributed:
        from engine.cli.distributed import run_distributed

        request = _request(
            state, inventory, limit, overrides, Mode.APPLY if apply else Mode.DRY_RUN
        )
        # Nobody is asked during a distributed run: --yes approves destructive steps.
        with run_distributed(
            settings,
            found,
            request,
            approved=yes,
            shard_size=shard_size,
            console=_progress_console(output is Output.TABLE),
        ) as followed:
            if output is Output.JSON:  # a fleet's report is written a page at a time
                followed.write_json(state.console.file)
                if not followed.ok:
                    raise typer.Exit(EXIT_NOT_FIXED)
                return
            _show_report(state, followed.whole(), output)
        return
    executor, first_probe = _start_first_probe(settings, found, inventory, limit, overrides)
    # ansible-playbook runs: the pipeline is imported (and the store opened) meanwhile.
    from engine.pipeline import run_runbook

    with (
        first_probe,
        open_services(
            settings, reporter_console=_progress_console(output is Output.TABLE), executor=executor
        ) as services,
    ):
        request = _request(
            state, inventory, limit, overrides, Mode.APPLY if apply else Mode.DRY_RUN
        )
        report = run_runbook(
            found, request, services, approve=_approver(yes), first_probe=first_probe
        )
    _show_report(state, report, output)


@app.command("apply")
def apply_plan(
    ctx: typer.Context,
    plan_file: Annotated[Path, typer.Argument(help="A plan saved with `remediate plan --out`")],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Approve steps that need approval without asking")
    ] = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Apply a reviewed plan: drifted hosts are refused, the others get exactly the plan."""
    from engine.audit import utc_now
    from engine.cli.services import open_services, with_inventory_secrets
    from engine.pipeline import apply_saved_plan
    from engine.planfiles import check_applicable, load_plan
    from engine.runbooks import find_runbook

    state = cli_state(ctx)
    saved = load_plan(plan_file)
    settings = with_inventory_secrets(state.settings, Path(saved.plan.inventory))
    runbook = find_runbook(
        saved.plan.runbook.name, settings.runbooks_dir, playbooks_dir=settings.playbooks_dir
    )
    check_applicable(saved, runbook, utc_now(), plan_file)
    with open_services(settings, reporter_console=_progress_console(output is Output.TABLE)) as (
        services
    ):
        report = apply_saved_plan(
            saved,
            runbook,
            services,
            user=settings.user,
            trigger=f"user:{settings.user}",
            approve=_approver(yes),
        )
    _show_report(state, report, output)


@app.command("show-plan")
def show_plan(
    ctx: typer.Context,
    plan_file: Annotated[Path, typer.Argument(help="A plan saved with `remediate plan --out`")],
    output: PlanFormatOpt = PlanFormat.TABLE,
) -> None:
    """Show a saved plan (its digest is checked first)."""
    from engine.cli.render import plan_table
    from engine.planfiles import load_plan, render_markdown

    state = cli_state(ctx)
    saved = load_plan(plan_file)
    if output is PlanFormat.JSON:
        print_json(state.console, saved.model_dump(mode="json"))
    elif output is PlanFormat.MARKDOWN:
        state.console.file.write(render_markdown(saved))
    else:
        state.console.print(plan_table(saved.plan))
        state.console.print(
            f"digest {saved.digest}, expires {saved.expires_at:%Y-%m-%d %H:%M:%S} UTC",
            markup=False,
        )


@app.command()
def history(
    ctx: typer.Context,
    run_id: Annotated[
        str | None,
        typer.Argument(help="Show one run's hosts instead of the list (full or short id)"),
    ] = None,
    runbook: Annotated[str | None, typer.Option(help="Only runs of this runbook")] = None,
    host: Annotated[str | None, typer.Option(help="Only runs that reached this host")] = None,
    status: Annotated[RunStatus | None, typer.Option(help="Only runs that ended so")] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only runs started since: a duration back from now (30m, 2h, 7d) or a time "
            "(2026-12-01T08:00Z)"
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "--last", min=1, help="How many runs")] = 20,
    wide: Annotated[
        bool, typer.Option("--wide", help="Full run ids, triggers and times (wider than 80)")
    ] = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Past runs, newest first; or the hosts of one run."""
    from engine.cli.render import history_table, host_records_table
    from engine.cli.services import open_store

    state = cli_state(ctx)
    with open_store(state.settings) as store:
        if run_id is None:
            runs = store.list_runs(
                limit=limit,
                runbook=runbook,
                host=host,
                status=status,
                since=_since(since) if since is not None else None,
            )
            if output is Output.JSON:
                print_json(state.console, [r.model_dump(mode="json") for r in runs])
            else:
                state.console.print(history_table(runs, wide=wide, width=state.console.width))
            return
        record = _one_run(store, run_id, state.settings)
        hosts = store.host_records(record.run_id)
    if output is Output.JSON:
        data = record.model_dump(mode="json")
        data["hosts"] = [h.model_dump(mode="json") for h in hosts]
        print_json(state.console, data)
    else:
        state.console.print(history_table([record], wide=True))
        state.console.print(host_records_table(hosts))


def _since(text: str) -> datetime:
    """``--since``: a duration back from now, or an ISO-8601 time (UTC when it has no zone)."""
    from engine.durations import parse_duration

    try:
        return datetime.now(UTC) - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise typer.BadParameter(
            f"{text!r}: give a duration (30m, 2h, 7d) or a time (2026-12-01T08:00Z)",
            param_hint="--since",
        ) from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _one_run(store: StateStore, run_id: str, settings: Settings) -> RunRecord:
    """The run ``run_id`` names: its full id, or the end of one (the short id tables show)."""
    record = store.get_run(run_id)
    if record is not None:
        return record
    found = store.list_runs(limit=2, id_suffix=run_id) if run_id else []
    if len(found) == 1:
        return found[0]
    from engine.state import redacted_url

    where = redacted_url(settings.database_url())
    if found:
        ids = ", ".join(r.run_id for r in found)
        raise InputError(f"run id {run_id!r} is ambiguous in {where}: {ids}, ...; give more of it")
    raise InputError(f"no run {run_id!r} in {where}")
