"""Load runbook files: YAML with line numbers → :class:`RunbookSpec` → compiled :class:`Runbook`.

Every problem in a file is collected and raised as one :class:`RunbookError` listing
``file:line: field: message`` for each, so an author fixes them all in one pass.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from engine.errors import ParamError, Problem, RunbookError
from engine.expressions import (
    HOST_ATTRS,
    CompileError,
    Expression,
    Scope,
    Template,
    compile_expression,
    compile_template,
    is_template,
)
from engine.runbooks.spec import ExprGuard, RunbookSpec, coerce_param

Loc = tuple[str | int, ...]

#: Runbook files are found by these suffixes when a directory is given.
RUNBOOK_SUFFIXES = (".yml", ".yaml")


@dataclass(frozen=True, eq=False)
class CompiledStep:
    """A step's expressions and templates, compiled at load time."""

    when: Expression
    items: Expression | None
    plan: Template
    vars: Mapping[str, Any]  # leaves that held template syntax are Template objects


@dataclass(frozen=True, eq=False)
class Runbook:
    """A loaded, valid runbook: the spec, where it came from, and its compiled expressions."""

    spec: RunbookSpec
    path: Path
    digest: str  # sha256 of the file's bytes: the runbook's identity in plans and audit
    playbooks_dir: Path
    symptom: Expression
    guards: Mapping[str, Expression]  # expression guards by id
    steps: Mapping[str, CompiledStep]
    verify: Expression
    explain: Template | None = None  # what is left, when verify does not hold

    @property
    def name(self) -> str:
        """The runbook's name."""
        return self.spec.metadata.name

    def playbook_path(self, step_id: str) -> Path:
        """Absolute path of a step's playbook."""
        step = next(s for s in self.spec.steps if s.id == step_id)
        return (self.playbooks_dir / step.playbook).resolve()

    def param_values(self, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Params with defaults applied and ``-e`` overrides converted to their types."""
        values = {name: param.value for name, param in self.spec.params.items()}
        for name, raw in (overrides or {}).items():
            param = self.spec.params.get(name)
            if param is None:
                known = ", ".join(sorted(self.spec.params)) or "none"
                raise ParamError(
                    f"runbook {self.name!r} has no parameter {name!r} (parameters: {known})"
                )
            try:
                values[name] = coerce_param(param.type, raw)
            except ValueError as exc:
                raise ParamError(f"runbook {self.name!r}: parameter {name!r}: {exc}") from exc
        return values

    @property
    def secret_params(self) -> frozenset[str]:
        """Names of params whose values must never be shown or logged."""
        return frozenset(n for n, p in self.spec.params.items() if p.secret)


# --- YAML with line numbers -------------------------------------------------------------------


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def _to_plain(node: object) -> object:
    """Convert ruamel's round-trip containers and scalars to plain Python values."""
    if isinstance(node, dict):
        return {str(k): _to_plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_plain(v) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def _locate(root: object, loc: Loc) -> tuple[int | None, str]:
    """Map a pydantic-style ``loc`` to the YAML line of the deepest node that exists."""
    node, line = root, 1
    parts: list[str] = []
    for seg in loc:
        if isinstance(node, CommentedMap) and seg in node:
            line = node.lc.key(seg)[0] + 1
            node = node[seg]
        elif isinstance(node, CommentedSeq) and isinstance(seg, int) and 0 <= seg < len(node):
            line = node.lc.item(seg)[0] + 1
            node = node[seg]
        else:
            node = None
        parts.append(f"[{seg}]" if isinstance(seg, int) else f".{seg}" if parts else str(seg))
    return line, "".join(parts)


def _pydantic_problems(file: str, root: object, exc: ValidationError) -> Iterator[Problem]:
    errors = exc.errors(include_url=False)
    locs = [tuple(err["loc"]) for err in errors]
    for err, raw_loc in zip(errors, locs, strict=True):
        # A list whose items are invalid is also reported "too short": say only the real cause.
        if err["type"] == "too_short" and any(
            o[: len(raw_loc)] == raw_loc and o != raw_loc for o in locs
        ):
            continue
        loc = raw_loc
        # Tagged unions (guards) put the tag into loc; it is not a YAML key.
        if len(loc) > 2 and loc[0] == "guards":  # noqa: PLR2004 - ("guards", index, tag, ...)
            loc = loc[:2] + loc[3:]
        ctx = err.get("ctx", {})
        if loc and loc[-1] == "[key]":
            loc, message = loc[:-1], f"bad name: {str(err['msg']).removeprefix('Value error, ')}"
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "required field is missing"
        elif err["type"] in {"enum", "literal_error"}:
            message = f"{err['input']!r} is not allowed: expected {ctx.get('expected')}"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        line, field = _locate(root, loc)
        yield Problem(file, line, field, message)


# --- checks across fields ---------------------------------------------------------------------


def _duplicates(file: str, root: object, section: str, ids: Sequence[str]) -> Iterator[Problem]:
    counts = Counter(ids)
    for index, ident in enumerate(ids):
        if counts[ident] > 1 and ids.index(ident) != index:
            line, field = _locate(root, (section, index, "id"))
            yield Problem(file, line, field, f"duplicate id {ident!r} in {section}")


def _shell_syntax_problem(command: str) -> str | None:
    """Check a check's command with ``sh -n`` (syntax only; nothing runs)."""
    sh = shutil.which("sh")
    if sh is None:  # pragma: no cover - every POSIX system has sh
        return None
    proc = subprocess.run(
        [sh, "-n", "-c", command], capture_output=True, text=True, timeout=10, check=False
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip().rsplit(": ", 1)[-1] if proc.stderr.strip() else "sh -n failed"
        return f"shell syntax error: {detail}"
    return None


class _Compiler:
    """Compiles one spec's expressions, collecting located problems."""

    def __init__(self, file: str, root: object) -> None:
        self.file, self.root = file, root
        self.problems: list[Problem] = []

    def _fail(self, loc: Loc, message: str) -> None:
        line, field = _locate(self.root, loc)
        self.problems.append(Problem(self.file, line, field, message))

    def expression(self, source: str, scope: Scope, loc: Loc) -> Expression | None:
        try:
            return compile_expression(source, scope)
        except CompileError as exc:
            self._fail(loc, str(exc))
            return None

    def template(self, source: str, scope: Scope, loc: Loc) -> Template | None:
        try:
            return compile_template(source, scope)
        except CompileError as exc:
            self._fail(loc, str(exc))
            return None

    def vars(self, value: Any, scope: Scope, loc: Loc) -> Any:
        """Compile string leaves holding template syntax; keep other values as they are."""
        if isinstance(value, str) and is_template(value):
            return self.template(value, scope, loc)
        if isinstance(value, dict):
            return {k: self.vars(v, scope, (*loc, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.vars(v, scope, (*loc, i)) for i, v in enumerate(value)]
        return value


def _semantic_problems_and_runbook(
    path: Path, digest: str, root: object, spec: RunbookSpec, playbooks_dir: Path
) -> tuple[list[Problem], Runbook | None]:
    file = str(path)
    problems: list[Problem] = []
    problems += _duplicates(file, root, "checks", [c.id for c in spec.checks])
    problems += _duplicates(file, root, "guards", [g.id for g in spec.guards])
    problems += _duplicates(file, root, "steps", [s.id for s in spec.steps])

    for index, check in enumerate(spec.checks):
        message = _shell_syntax_problem(check.command)
        if message:
            line, field = _locate(root, ("checks", index, "run"))
            problems.append(Problem(file, line, field, message))

    base_dir = playbooks_dir.resolve()
    for index, step in enumerate(spec.steps):
        target = (base_dir / step.playbook).resolve()
        if not target.is_relative_to(base_dir):
            message = f"playbook {step.playbook!r} is outside {playbooks_dir}"
        elif not target.is_file():
            message = f"playbook {step.playbook!r} not found in {playbooks_dir}"
        else:
            continue
        line, field = _locate(root, ("steps", index, "playbook"))
        problems.append(Problem(file, line, field, message))

    check_ids = frozenset(c.id for c in spec.checks)
    scope = Scope({"checks": check_ids, "params": frozenset(spec.params), "host": HOST_ATTRS})
    step_scope = scope.with_names(items=None)
    compiler = _Compiler(file, root)
    symptom = compiler.expression(spec.symptom, scope, ("symptom",))
    guards = {
        g.id: compiler.expression(g.expr, scope, ("guards", i, "expr"))
        for i, g in enumerate(spec.guards)
        if isinstance(g, ExprGuard)
    }
    steps = {}
    for i, step in enumerate(spec.steps):
        when = compiler.expression(step.when, scope, ("steps", i, "when"))
        items = (
            compiler.expression(step.items, scope, ("steps", i, "items"))
            if step.items is not None
            else None
        )
        plan = compiler.template(step.plan, step_scope, ("steps", i, "plan"))
        step_vars = compiler.vars(step.vars, step_scope, ("steps", i, "vars"))
        if when is not None and plan is not None:
            steps[step.id] = CompiledStep(when, items, plan, step_vars)
    verify_scope = scope.with_names(before=check_ids)
    verify = compiler.expression(spec.verify.expr, verify_scope, ("verify",))
    explain = (
        compiler.template(spec.verify.explain, verify_scope, ("verify", "explain"))
        if spec.verify.explain is not None
        else None
    )
    problems += compiler.problems
    if problems or symptom is None or verify is None or None in guards.values():
        return problems, None
    return problems, Runbook(
        spec=spec,
        path=path,
        digest=digest,
        playbooks_dir=base_dir,
        symptom=symptom,
        guards={k: v for k, v in guards.items() if v is not None},
        steps=steps,
        verify=verify,
        explain=explain,
    )


def _inline_run_files(
    path: Path, root: object, spec: RunbookSpec
) -> tuple[RunbookSpec, list[bytes], list[Problem]]:
    """Replace each check's ``run_file`` with the script's text (part of the runbook digest)."""
    base = path.resolve().parent
    checks, scripts, problems = [], [], []
    for index, check in enumerate(spec.checks):
        if check.run_file is None:
            checks.append(check)
            continue
        target = (base / check.run_file).resolve()
        line, field = _locate(root, ("checks", index, "run_file"))
        if not target.is_relative_to(base):
            problems.append(
                Problem(str(path), line, field, f"{check.run_file!r} is outside {base}")
            )
            continue
        try:
            content = target.read_bytes()
        except OSError as exc:
            problems.append(Problem(str(path), line, field, f"cannot read: {exc.strerror}"))
            continue
        scripts.append(content)
        checks.append(check.model_copy(update={"run": content.decode("utf-8", "replace")}))
    return spec.model_copy(update={"checks": tuple(checks)}), scripts, problems


def _by_line(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: p.line or 0)


# --- public API -------------------------------------------------------------------------------


def default_playbooks_dir(runbook_path: Path) -> Path:
    """``playbooks/`` beside the folder that holds the runbook (the project layout)."""
    return runbook_path.resolve().parent.parent / "playbooks"


def load_runbook(path: Path, *, playbooks_dir: Path | None = None) -> Runbook:
    """Load and validate one runbook file; raise :class:`RunbookError` listing every problem."""
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RunbookError([Problem(file, None, "", f"cannot read: {exc.strerror}")]) from exc
    digest = hashlib.sha256(data).hexdigest()
    try:
        root = _yaml().load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RunbookError([Problem(file, None, "", "not UTF-8 text")]) from exc
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        message = f"YAML: {exc.problem or exc.context}"
        raise RunbookError([Problem(file, line, "", message)]) from exc
    except YAMLError as exc:
        raise RunbookError([Problem(file, None, "", f"YAML: {exc}")]) from exc
    if not isinstance(root, CommentedMap):
        line = root.lc.line + 1 if isinstance(root, CommentedSeq) else 1
        raise RunbookError([Problem(file, line, "", "a runbook must be a YAML mapping")])
    try:
        spec = RunbookSpec.model_validate(_to_plain(root))
    except ValidationError as exc:
        raise RunbookError(_by_line(_pydantic_problems(file, root, exc))) from exc
    spec, scripts, script_problems = _inline_run_files(path, root, spec)
    if script_problems:
        raise RunbookError(_by_line(script_problems))
    if scripts:
        digest = hashlib.sha256(data + b"".join(scripts)).hexdigest()
    books = playbooks_dir if playbooks_dir is not None else default_playbooks_dir(path)
    problems, runbook = _semantic_problems_and_runbook(path, digest, root, spec, books)
    if problems or runbook is None:
        raise RunbookError(_by_line(problems))
    return runbook


def runbook_files(paths: Iterable[Path]) -> list[Path]:
    """Expand directories to the runbook files in them, sorted; keep files as given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in RUNBOOK_SUFFIXES)
        else:
            files.append(path)
    return files


def load_runbooks(paths: Iterable[Path], *, playbooks_dir: Path | None = None) -> list[Runbook]:
    """Load every runbook under ``paths``; one :class:`RunbookError` lists all problems."""
    runbooks: list[Runbook] = []
    problems: list[Problem] = []
    for file in runbook_files(paths):
        try:
            runbooks.append(load_runbook(file, playbooks_dir=playbooks_dir))
        except RunbookError as exc:
            problems += exc.problems
    seen: dict[str, Path] = {}
    for runbook in runbooks:
        if runbook.name in seen:
            problems.append(
                Problem(
                    str(runbook.path),
                    _locate_name_line(runbook.path),
                    "metadata.name",
                    f"runbook name {runbook.name!r} is also used by {seen[runbook.name]}",
                )
            )
        seen.setdefault(runbook.name, runbook.path)
    if problems:
        raise RunbookError(problems)
    return runbooks


def _locate_name_line(path: Path) -> int | None:
    root = _yaml().load(path.read_text(encoding="utf-8"))
    return _locate(root, ("metadata", "name"))[0]


def find_runbook(
    name_or_path: str, runbooks_dir: Path, *, playbooks_dir: Path | None = None
) -> Runbook:
    """A runbook by file path, or by name among the runbooks in ``runbooks_dir``."""
    candidate = Path(name_or_path)
    if candidate.suffix in RUNBOOK_SUFFIXES and candidate.is_file():
        return load_runbook(candidate, playbooks_dir=playbooks_dir)
    for suffix in RUNBOOK_SUFFIXES:
        direct = runbooks_dir / f"{name_or_path}{suffix}"
        if direct.is_file():
            runbook = load_runbook(direct, playbooks_dir=playbooks_dir)
            if runbook.name == name_or_path:
                return runbook
    for runbook in load_runbooks([runbooks_dir], playbooks_dir=playbooks_dir):
        if runbook.name == name_or_path:
            return runbook
    raise RunbookError([Problem(str(runbooks_dir), None, "", f"no runbook named {name_or_path!r}")])
