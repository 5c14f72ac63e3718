"""``remediate route``: where alerts would go, or exactly why not, as the server decides it.

The same code path as the webhook server's routing: the runbooks' triggers through
:class:`~engine.server.routing.Router` (its :meth:`~engine.server.routing.Router.explain`),
the inventory through :func:`~engine.server.fleet.load_fleet` and ``resolve_targets``.  It
records nothing and reaches no device: the tool for wiring Prometheus rules to runbooks.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engine.cli.app import EXIT_NOT_FIXED, Output, OutputOpt, app, cli_state, print_json

if TYPE_CHECKING:
    from rich.console import Console

    from engine.server.routing import Explanation, Mismatch, RunbookExplanation

#: A Prometheus label name.
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: In ``k=v,k=v``: a comma that starts the next label (a comma before ``name=``).
_NEXT_PAIR = re.compile(r",\s*(?=[a-zA-Z_][a-zA-Z0-9_]*=)")
#: Label text shown to people is cut to this many characters (it is untrusted and may be huge).
_SHOWN_CHARS = 80

_MODE_TEXT = {
    "apply": "apply",
    "plan": "plan (a dry run)",
    "approve": "approve (a dry run whose plan waits for an approver)",
}

LABELS_HELP = (
    "The labels of one alert instead of a body: name=value pairs separated by commas "
    "(repeatable); a comma belongs to the value unless a name= follows it. Or the "
    'Prometheus form {name="value", ...} with quoted values.'
)


def parse_labels(values: Sequence[str]) -> dict[str, str]:
    """``--labels`` values as one label set; a bad one is a usage error naming it."""
    labels: dict[str, str] = {}
    for text in values:
        for name, value in _label_pairs(text):
            if name in labels:
                raise typer.BadParameter(f"label {name!r} is given twice", param_hint="--labels")
            labels[name] = value
    return labels


def _label_pairs(text: str) -> list[tuple[str, str]]:
    stripped = text.strip()
    if stripped.startswith("{"):
        from prometheus_client.parser import text_string_to_metric_families

        try:
            families = list(text_string_to_metric_families(f"alert{stripped} 0\n"))
        except ValueError as exc:
            raise typer.BadParameter(
                f'{text!r}: not a label set {{name="value", ...}} ({exc})', param_hint="--labels"
            ) from exc
        return list(families[0].samples[0].labels.items())
    pairs = []
    for part in _NEXT_PAIR.split(stripped):
        name, sep, value = part.partition("=")
        if not sep or not _LABEL_NAME.fullmatch(name.strip()):
            raise typer.BadParameter(
                f"{text!r}: expected name=value pairs separated by commas", param_hint="--labels"
            )
        pairs.append((name.strip(), value))
    return pairs


def _read_body(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"{source}: {exc.strerror}", param_hint="BODY") from exc


@app.command()
def route(
    ctx: typer.Context,
    body: Annotated[
        str | None,
        typer.Argument(
            metavar="BODY", help="Alertmanager webhook body (JSON): a file, or - for stdin"
        ),
    ] = None,
    labels: Annotated[list[str] | None, typer.Option("--labels", "-L", help=LABELS_HELP)] = None,
    inventory: Annotated[
        Path | None,
        typer.Option("--inventory", "-i", help="Ansible inventory [default: the --config file's]"),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Server configuration: its inventory, runbooks and playbooks"
        ),
    ] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Show which runbook and inventory host each alert would go to, in which mode, or why not.

    Routes as `remediate serve` does (same triggers, same inventory lookup), without
    recording anything or reaching a device. Exit 0 when every firing alert would start a
    run, 1 when one would not.
    """
    from engine.audit import utc_now
    from engine.runbooks import load_runbooks
    from engine.server.alerts import BodyError, parse_webhook
    from engine.server.config import load_server_config
    from engine.server.fleet import load_fleet
    from engine.server.routing import Router
    from engine.targets import resolve_targets

    if (body is None) == (not labels):
        raise typer.BadParameter("give either an Alertmanager body (a file, or -) or --labels")
    settings = cli_state(ctx).settings
    runbooks_dir, playbooks_dir = settings.runbooks_dir, settings.playbooks_dir
    if config is not None:
        server = load_server_config(config, os.environ)
        runbooks_dir, playbooks_dir = server.runbooks(settings), server.playbooks(settings)
        inventory = inventory or server.inventory
    if inventory is None:
        raise typer.BadParameter("give the inventory (-i) or a server --config")
    alerts: list[tuple[str, str | None, Mapping[str, str]]]
    if body is not None:
        try:
            message = parse_webhook(_read_body(body))
        except BodyError as exc:
            raise BodyError(f"{body}: {exc.field}", exc.message) from exc
        alerts = [(a.status, a.fingerprint, a.labels) for a in message.alerts]
    else:
        alerts = [("firing", None, parse_labels(labels or ()))]
    router = Router(load_runbooks([runbooks_dir], playbooks_dir=playbooks_dir))
    fleet = load_fleet(inventory, router.index_keys, resolve_targets, utc_now())
    explained = [(status, fp, lbls, router.explain(lbls, fleet)) for status, fp, lbls in alerts]
    console = cli_state(ctx).console
    if output is Output.JSON:
        print_json(
            console,
            {
                "inventory": str(inventory),
                "runbooks_dir": str(runbooks_dir),
                "alerts": [_alert_dict(*row) for row in explained],
            },
        )
    else:
        if not router.runbooks:
            console.print(f"no runbook in {runbooks_dir} has triggers", markup=False)
        for number, row in enumerate(explained, 1):
            _print_alert(console, number, len(explained), *row)
    if any(status == "firing" and not ex.routing.routes for status, _, _, ex in explained):
        raise typer.Exit(EXIT_NOT_FIXED)


# ------------------------------------------------------------------------------- output


def _trigger(index: int) -> str:
    return f"triggers[{index}]"


def _mismatch_dict(mismatch: Mismatch | None) -> dict[str, Any]:
    if mismatch is None:
        return {"matched": True}
    return {
        "matched": False,
        "matcher": mismatch.matcher.value,
        "label": mismatch.label,
        "expected": list(mismatch.expected),
        "actual": mismatch.actual,
    }


def _runbook_dict(rb: RunbookExplanation) -> dict[str, Any]:
    return {
        "runbook": rb.runbook,
        "trigger": None if rb.trigger is None else _trigger(rb.trigger),
        "triggers": [
            {"trigger": _trigger(t.index), **_mismatch_dict(t.mismatch)} for t in rb.triggers
        ],
        "device": None
        if rb.device is None
        else {
            "label": rb.device.label,
            "hosts": list(rb.device.hosts),
            "problem": rb.device.problem,
        },
        "route": None if rb.route is None else rb.route.model_dump(mode="json"),
    }


def _alert_dict(
    status: str, fingerprint: str | None, labels: Mapping[str, str], explanation: Explanation
) -> dict[str, Any]:
    routing = explanation.routing
    return {
        "alertname": labels.get("alertname"),
        "status": status,
        "fingerprint": fingerprint,
        "labels": dict(labels),
        "outcome": routing.outcome.value,
        "reason": routing.reason,
        "routes": [r.model_dump(mode="json") for r in routing.routes],
        "runbooks": [_runbook_dict(rb) for rb in explanation.runbooks],
    }


def _shown(value: str | None) -> str:
    """Untrusted label text for people: quoted, escaped, cut short; or ``missing``."""
    if value is None:
        return "missing"
    if len(value) > _SHOWN_CHARS:
        return repr(value[:_SHOWN_CHARS]) + f"... ({len(value)} characters)"
    return repr(value)


def _why_not(mismatch: Mismatch) -> str:
    from engine.server.routing import Matcher

    actual = _shown(mismatch.actual)
    wanted = ", ".join(mismatch.expected)
    if mismatch.matcher is Matcher.ALERTNAME:
        one_of = "one of " if len(mismatch.expected) > 1 else ""
        return f"alertname {actual} is not {one_of}{wanted}"
    if mismatch.matcher is Matcher.MATCH:
        return f"label {mismatch.label} is {actual}, not {_shown(mismatch.expected[0])}"
    return f"label {mismatch.label} is {actual}, which does not fully match {wanted}"


def _print_alert(
    console: Console,
    number: int,
    total: int,
    status: str,
    fingerprint: str | None,
    labels: Mapping[str, str],
    explanation: Explanation,
) -> None:
    from rich.text import Text

    routing = explanation.routing
    head = Text(f"alert {number}/{total}: ", style="bold")
    head.append(_shown(labels.get("alertname")))
    head.append(f" ({status}" + (f", fingerprint {fingerprint})" if fingerprint else ")"))
    if status == "resolved":
        head.append(f" -> resolved (routing: {routing.outcome.value})")
    else:
        head.append(f" -> {routing.outcome.value}", style="green" if routing.routes else "red")
    console.print(head, soft_wrap=True)
    if status == "resolved":
        console.print(
            "  resolved: the server closes its firing and cancels its runs not yet started; "
            "it starts nothing",
            markup=False,
            soft_wrap=True,
        )
    for rb in explanation.runbooks:
        device, trigger = rb.device, rb.trigger
        if device is None or trigger is None:
            console.print(Text(f"  {rb.runbook}: no trigger matches"), soft_wrap=True)
            for check in rb.triggers:
                if check.mismatch is not None:
                    why = f"    {_trigger(check.index)}: {_why_not(check.mismatch)}"
                    console.print(Text(why), soft_wrap=True)
        elif rb.route is not None:
            mode = _MODE_TEXT.get(rb.route.trigger_mode, rb.route.trigger_mode)
            line = (
                f"  {rb.runbook}: {_trigger(trigger)} matches -> host {rb.route.host} "
                f"(by label {device.label}), mode {mode}"
            )
            console.print(Text(line, style="green"), soft_wrap=True)
        else:
            line = f"  {rb.runbook}: {_trigger(trigger)} matches, but no host: {device.problem}"
            console.print(Text(line, style="red"), soft_wrap=True)
