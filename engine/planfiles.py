"""Saved plans: a dry-run's plan as a reviewable file that an apply can trust.

The file is JSON: the plan (per host: the evidence the decision rested on, the guard results,
the steps with their rendered vars and exact items), who made it and when, when it expires,
and a sha256 digest over all of that.  An edited file no longer matches its digest and is
refused; so is an expired plan, or one whose runbook changed since.

A saved plan never holds a secret: the values the engine knows to be secret are scrubbed
from it (:func:`seal_plan`) before the digest is taken, and the file is readable by its owner
only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.errors import PlanFileError
from engine.outcomes import HostOutcome
from engine.plans import HostPlan, Plan
from engine.privacy import write_private
from engine.redaction import NO_SECRETS, Secrets
from engine.runbooks import Runbook

FORMAT: Literal["remediate-plan/v1"] = "remediate-plan/v1"


class SavedPlan(BaseModel):
    """A plan as saved for review, with its expiry and content digest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["remediate-plan/v1"] = FORMAT
    plan: Plan
    expires_at: datetime
    digest: str = ""

    def computed_digest(self) -> str:
        """sha256 over the canonical JSON of everything but the digest itself."""
        body = self.model_dump(mode="json", exclude={"digest"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def sealed(self) -> SavedPlan:
        """A copy carrying its digest."""
        return self.model_copy(update={"digest": self.computed_digest()})


def seal_plan(plan: Plan, expires_at: datetime, secrets: Secrets = NO_SECRETS) -> SavedPlan:
    """``plan`` as saved for review: ``secrets`` scrubbed, expiring at ``expires_at``, sealed."""
    return SavedPlan(plan=secrets.scrub_model(plan), expires_at=expires_at).sealed()


def save_plan(
    plan: Plan, path: Path, *, expires_in: timedelta, secrets: Secrets = NO_SECRETS
) -> SavedPlan:
    """Write ``plan`` to ``path`` (atomically, owner-only) sealed by :func:`seal_plan`."""
    saved = seal_plan(plan, plan.created_at + expires_in, secrets)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, saved.model_dump_json(indent=2) + "\n")
    return saved


class LazyList(list[Any]):
    """A JSON array whose items are read when it is encoded, never held at once.

    :class:`json.JSONEncoder` encodes any ``list`` by iterating it (``iterencode``, or
    ``dumps`` with an indent: the encoder written in Python); this one iterates
    ``items()`` afresh each time, so a fleet's hosts can be written a page at a time.
    """

    def __init__(self, items: Callable[[], Iterator[Any]], *, empty: bool) -> None:
        super().__init__()
        self._items, self._empty = items, empty

    def __iter__(self) -> Iterator[Any]:
        return self._items()

    def __bool__(self) -> bool:
        return not self._empty

    def __len__(self) -> int:  # only emptiness is ever asked by the encoder
        return 0 if self._empty else 1


def save_plan_pages(
    meta: Plan,
    hosts: Callable[[], Iterator[HostPlan]],
    path: Path,
    *,
    expires_in: timedelta,
    empty: bool = False,
) -> tuple[str, datetime]:
    """:func:`save_plan` for a plan whose hosts are read a page at a time (its digest, expiry).

    ``meta`` is the plan without its hosts; ``hosts()`` yields them (secrets already
    scrubbed), and is called twice (the digest, then the file).  The file and its digest
    are those :func:`save_plan` writes for the whole plan.
    """
    expires_at = meta.created_at + expires_in
    body = SavedPlan(plan=meta, expires_at=expires_at).model_dump(mode="json", exclude={"digest"})

    def with_hosts() -> dict[str, Any]:
        items = LazyList(lambda: (h.model_dump(mode="json") for h in hosts()), empty=empty)
        return {**body, "plan": {**body["plan"], "hosts": items}}

    digest = hashlib.sha256()
    canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for chunk in canonical.iterencode(with_hosts()):
        digest.update(chunk.encode("utf-8"))
    sealed = {**with_hosts(), "digest": digest.hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, _lines(json.JSONEncoder(indent=2, ensure_ascii=False).iterencode(sealed)))
    return digest.hexdigest(), expires_at


def _lines(chunks: Iterable[str]) -> Iterator[str]:
    yield from chunks
    yield "\n"


def load_plan(path: Path) -> SavedPlan:
    """Read a saved plan and check its digest; an edited or unreadable file is refused."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanFileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data: Any = json.loads(raw)
        saved = SavedPlan.model_validate(data)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise PlanFileError(f"{path}: not a remediate plan file: {exc}") from exc
    if not saved.digest or saved.digest != saved.computed_digest():
        raise PlanFileError(f"{path}: the plan was edited after it was made (digest mismatch)")
    return saved


def check_applicable(saved: SavedPlan, runbook: Runbook, now: datetime, path: Path) -> None:
    """Refuse a plan that expired or was made from another version of the runbook."""
    if now >= saved.expires_at:
        raise PlanFileError(f"{path}: the plan expired at {saved.expires_at.isoformat()}")
    ref = saved.plan.runbook
    if ref.name != runbook.name:
        raise PlanFileError(f"{path}: the plan is for runbook {ref.name!r}, not {runbook.name!r}")
    if ref.digest != runbook.digest:
        raise PlanFileError(
            f"{path}: runbook {ref.name!r} changed since the plan was made "
            f"(plan {ref.digest[:12]}, now {runbook.digest[:12]} in {runbook.path})"
        )


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(saved: SavedPlan) -> str:
    """A review document for a ticket or a pull request."""
    plan = saved.plan
    ref = plan.runbook
    out = [
        f"# Remediation plan: {ref.name} v{ref.version}",
        "",
        f"- Plan: `{plan.run_id}`, digest `{saved.digest}`",
        f"- Runbook: `{ref.path}` (sha256 `{ref.digest}`)",
        f"- Inventory: `{plan.inventory}`, hosts `{plan.pattern}`"
        + (f", limit `{plan.limit}`" if plan.limit else ""),
        (
            f"- Made by {plan.created_by} at {plan.created_at.isoformat()}; "
            f"expires {saved.expires_at.isoformat()}"
        ),
    ]
    if plan.params:
        out.append("- Parameters: " + ", ".join(f"`{k}={v}`" for k, v in plan.params.items()))
    if plan.refused:
        out += ["", f"**The run is refused:** {plan.refused}"]
    counts: dict[str, int] = {}
    for host in plan.hosts:
        counts[host.outcome.value] = counts.get(host.outcome.value, 0) + 1
    out += ["", "Summary: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())), ""]
    for host in plan.acting:
        out += [f"## {host.host}: {len(host.steps)} step(s)", ""]
        for number, step in enumerate(host.steps, start=1):
            flag = " **(destructive)**" if step.destructive else ""
            out.append(f"{number}. `{step.id}` ({step.playbook}){flag}: {step.plan}")
            if step.items:
                out += [f"   - item: `{_cell(item)}`" for item in step.items]
            if step.vars:
                out.append(f"   - vars: `{_cell(step.vars)}`")
        out += ["", "| guard | result | message |", "|---|---|---|"]
        out += [
            f"| {g.id} | {'passed' if g.passed else 'BLOCKS'} | {_cell(g.message)} |"
            for g in host.guards
        ]
        out += ["", "| evidence (check) | value |", "|---|---|"]
        out += [f"| {k} | {_cell(v)} |" for k, v in host.evidence.items()]
        out.append("")
    others = [h for h in plan.hosts if h.outcome is not HostOutcome.PLANNED]
    if others:
        out += ["## Hosts left alone", "", "| host | outcome | why |", "|---|---|---|"]
        out += [f"| {h.host} | {h.outcome.value} | {_cell(h.reason)} |" for h in others]
        out.append("")
    return "\n".join(out)
