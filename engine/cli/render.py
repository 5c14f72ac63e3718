"""How runbooks, problems and reports look to a person (Rich) and to a script (JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from engine.durations import format_duration
from engine.runbooks.spec import BlastRadiusGuard, CooldownGuard, ExprGuard, LockGuard

if TYPE_CHECKING:  # only annotations: importing the pipeline and the store here would be waste
    from engine.errors import Problem
    from engine.pipeline import RunReport
    from engine.plans import Plan
    from engine.runbooks import Runbook
    from engine.runbooks.spec import Policy, Trigger
    from engine.state import HostRecord, RunRecord


def problem_dict(problem: Problem) -> dict[str, Any]:
    """A problem as JSON data."""
    return {
        "file": problem.file,
        "line": problem.line,
        "field": problem.field,
        "message": problem.message,
    }


def print_problems(console: Console, problems: Sequence[Problem]) -> None:
    """One line per problem, ``file:line: field: message``."""
    for problem in problems:
        console.print(Text(str(problem), style="red"), soft_wrap=True)


def runbook_summary(runbook: Runbook) -> dict[str, Any]:
    """The fields ``remediate list`` shows."""
    spec = runbook.spec
    return {
        "name": spec.metadata.name,
        "title": spec.metadata.title,
        "severity": spec.metadata.severity.value,
        "version": spec.metadata.version,
        "triggers": [{"alertname": list(t.alertname), "mode": t.mode.value} for t in spec.triggers],
        "steps": [s.id for s in spec.steps],
        "file": str(runbook.path),
        "digest": runbook.digest,
    }


def runbooks_table(runbooks: Sequence[Runbook]) -> Table:
    """The table ``remediate list`` prints."""
    table = Table(title="Runbooks", title_justify="left")
    for column in ("name", "title", "severity", "triggers", "steps"):
        table.add_column(column)
    for runbook in runbooks:
        spec = runbook.spec
        triggers = "\n".join(f"{', '.join(t.alertname)} ({t.mode.value})" for t in spec.triggers)
        table.add_row(
            Text(spec.metadata.name, style="bold"),
            Text(spec.metadata.title),
            Text(spec.metadata.severity.value),
            Text(triggers or "-"),
            Text(str(len(spec.steps))),
        )
    return table


def _guard_line(guard: object) -> tuple[str, str, str]:
    if isinstance(guard, ExprGuard):
        return "expr", guard.expr, guard.message
    if isinstance(guard, CooldownGuard):
        return "cool-down", format_duration(guard.cooldown), guard.message
    if isinstance(guard, LockGuard):
        return "device lock", "one run per device at a time", guard.message
    if isinstance(guard, BlastRadiusGuard):
        return "blast radius", "policy max_hosts_pct / max_hosts", guard.message
    return "?", "", ""  # pragma: no cover - the union above is exhaustive


def _header(runbook: Runbook) -> Panel:
    meta = runbook.spec.metadata
    body = [
        Text.assemble(
            (meta.title, "bold"),
            f"  ({meta.name} v{meta.version}, severity {meta.severity.value})",
        )
    ]
    if meta.description:
        body.append(Text(meta.description.strip()))
    if meta.never:
        body.append(Text("It will never:", style="bold"))
        body += [Text(f"  - {item}") for item in meta.never]
    body.append(Text(f"Targets: {runbook.spec.targets.hosts}   File: {runbook.path}", style="dim"))
    return Panel(Group(*body), expand=False)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str | Text]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
    return table


def _trigger_row(trigger: Trigger) -> tuple[str, str, str, str]:
    labels = [f"{k}={v}" for k, v in trigger.match.items()]
    labels += [f"{k}=~{v}" for k, v in trigger.match_re.items()]
    names = trigger.device_label
    device = names[0] if len(names) == 1 else f"first of {', '.join(names)}"
    device += " (port stripped)" if trigger.strip_port else ""
    device += f" → host var {trigger.device_var}" if trigger.device_var else " → host name"
    return ", ".join(trigger.alertname), ", ".join(labels) or "-", device, trigger.mode.value


def _policy_line(policy: Policy) -> Text:
    cap = f", at most {policy.max_hosts} hosts" if policy.max_hosts else ""
    eyes = " (four eyes)" if policy.four_eyes else ""
    return Text(
        f"Policy: batches of {policy.serial}; stop above {policy.max_fail_pct}% failed; "
        f"act on at most {policy.max_hosts_pct}% of targeted hosts{cap}; "
        f"approval {policy.approval.value}{eyes}"
    )


def runbook_view(runbook: Runbook) -> Group:
    """The runbook as an operator reads it (``remediate show``)."""
    spec = runbook.spec
    verify = spec.verify
    retry = (
        f" (up to {verify.retries} tries, {format_duration(verify.delay)} apart)"
        if verify.retries > 1
        else ""
    )
    parts: list[Any] = [
        _header(runbook),
        _table(
            "Checks (read-only probes)",
            ("id", "parse", "timeout", "command"),
            [
                (
                    c.id,
                    c.parse.value,
                    format_duration(c.timeout),
                    f"script {c.run_file}" if c.run_file else c.command,
                )
                for c in spec.checks
            ],
        ),
        Text.assemble(("Symptom: ", "bold"), spec.symptom),
        _table(
            "Guards (checked in order, per device)",
            ("id", "kind", "condition", "message when it blocks"),
            [(g.id, *_guard_line(g)) for g in spec.guards],
        ),
        _table(
            "Steps (in order)",
            ("id", "playbook", "when", "plan line", "destructive"),
            [
                (s.id, s.playbook, s.when, s.plan, "yes" if s.destructive else "no")
                for s in spec.steps
            ],
        ),
        Text.assemble(("Verify: ", "bold"), verify.expr, retry),
    ]
    if spec.params:
        parts.append(
            _table(
                "Parameters (-e name=value)",
                ("name", "type", "default", "description"),
                [
                    (n, p.type.value, "[secret]" if p.secret else str(p.default), p.description)
                    for n, p in spec.params.items()
                ],
            )
        )
    if spec.triggers:
        parts.append(
            _table(
                "Alert triggers",
                ("alertname", "labels", "device from", "mode"),
                [_trigger_row(t) for t in spec.triggers],
            )
        )
    parts.append(_policy_line(spec.policy))
    return Group(*parts)


_OUTCOME_STYLE = {
    "healthy": "green",
    "fixed": "bold green",
    "planned": "bold yellow",
    "skipped": "cyan",
    "nothing_to_do": "dim",
    "not_fixed": "bold red",
    "failed": "bold red",
    "unreachable": "red",
    "error": "red",
    "refused": "magenta",
    "interrupted": "red",
}


def _outcome(value: str) -> Text:
    return Text(value, style=_OUTCOME_STYLE.get(value, ""))


def plan_table(plan: Plan) -> Table:
    """The dry-run plan: every host, its outcome and reason, and the steps it would get."""
    ref = plan.runbook
    title = (
        f"Plan {plan.run_id}: {ref.name} v{ref.version} on {plan.inventory}"
        + (f" --limit {plan.limit}" if plan.limit else "")
        + f" ({plan.mode.value})"
    )
    table = Table(title=title, title_justify="left", show_lines=True)
    for column in ("host", "outcome", "why", "steps (plan)"):
        table.add_column(column, overflow="fold")
    for host in plan.hosts:
        steps = Text(
            "\n".join(
                f"{i}. {s.id}{' [destructive]' if s.destructive else ''}: {s.plan}"
                for i, s in enumerate(host.steps, start=1)
            )
        )
        table.add_row(Text(host.host), _outcome(host.outcome.value), Text(host.reason), steps)
    if plan.refused:
        table.caption = f"RUN REFUSED: {plan.refused}"
    return table


def report_view(report: RunReport) -> Group:
    """The plan, then (for apply runs) how each host ended."""
    parts: list[Any] = [plan_table(report.plan)]
    acted = [h for h in report.hosts if h.steps]
    if acted:
        table = Table(title="Result", title_justify="left", show_lines=True)
        for column in ("host", "outcome", "steps run", "why"):
            table.add_column(column, overflow="fold")
        for host in report.hosts:
            steps = "\n".join(
                f"{s.step}: {s.status.value if s.status else 'skipped'}"
                f"{' (changed)' if s.changed else ''}"
                for s in host.steps
            )
            table.add_row(
                Text(host.host), _outcome(host.outcome.value), Text(steps), Text(host.reason)
            )
        parts.append(table)
    summary = ", ".join(f"{count} {outcome}" for outcome, count in sorted(report.summary.items()))
    parts.append(Text(f"Run {report.plan.run_id} {report.status.value}: {summary}"))
    return Group(*parts)


def history_table(runs: Sequence[RunRecord]) -> Table:
    """Past runs, newest first."""
    table = Table(title="Runs", title_justify="left")
    for column in ("run", "runbook", "mode", "trigger", "started", "status", "hosts"):
        table.add_column(column, overflow="fold")
    for run in runs:
        hosts = ", ".join(f"{n} {o}" for o, n in sorted(run.summary.items()))
        table.add_row(
            run.run_id,
            run.runbook,
            run.mode.value,
            Text(run.trigger),
            run.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            _outcome(run.status.value),
            hosts,
        )
    return table


def host_records_table(hosts: Sequence[HostRecord]) -> Table:
    """The hosts of one run."""
    table = Table(title="Hosts", title_justify="left")
    for column in ("host", "outcome", "steps", "why"):
        table.add_column(column, overflow="fold")
    for host in hosts:
        table.add_row(
            Text(host.host), _outcome(host.outcome.value), ", ".join(host.steps), Text(host.reason)
        )
    return table
