"""Expressions and templates: one sandboxed jinja2 environment for the whole engine.

Runbooks hold expressions (``symptom``, guard ``expr``, step ``when``/``items``, ``verify``)
and templates (step ``plan`` lines and string ``vars``).  All are compiled when a runbook
loads, and the names they use are checked against what the runbook declares, so a typo is
a load-time error.  Values from outside (probe output, alert labels) are only ever *data* in
a context: nothing from outside is compiled as a template.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.durations import format_duration, parse_duration
from engine.errors import EngineError


class EvaluationError(EngineError):
    """An expression or template failed while evaluating against real values."""


def _duration_filter(seconds: object) -> str:
    """Render seconds as ``1h30m``."""
    return format_duration(parse_duration(int(seconds) if isinstance(seconds, float) else seconds))


def _build_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False
    )
    env.filters["duration"] = _duration_filter
    return env


#: The one environment.  Nothing else in the engine creates a jinja2 environment.
ENV = _build_env()


@dataclass(frozen=True)
class Scope:
    """The names an expression may use.

    ``namespaces`` maps each top-level name to the attribute names allowed under it
    (``None``: any attribute, e.g. ``host.vars``).
    """

    namespaces: Mapping[str, frozenset[str] | None] = field(default_factory=dict)

    def with_names(self, **extra: frozenset[str] | None) -> Scope:
        """A wider scope with more top-level names."""
        return Scope({**self.namespaces, **extra})


#: Attributes of ``host`` in every scope.
HOST_ATTRS = frozenset({"name", "vars"})


def _name_problems(root: nodes.Node, scope: Scope, declared: set[str]) -> Iterator[str]:
    """Yield a message for each name the tree uses that the scope does not declare."""
    for name in sorted(declared - set(scope.namespaces)):
        known = ", ".join(sorted(scope.namespaces)) or "nothing"
        yield f"unknown name {name!r} (known here: {known})"
    for node in [root, *root.find_all((nodes.Getattr, nodes.Getitem))]:
        target = getattr(node, "node", None)
        if not isinstance(target, nodes.Name) or target.name not in scope.namespaces:
            continue
        allowed = scope.namespaces[target.name]
        if allowed is None:
            continue
        if isinstance(node, nodes.Getattr):
            attr: object = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            attr = node.arg.value
        else:
            continue
        if attr not in allowed:
            known = ", ".join(sorted(allowed)) or "none declared"
            yield f"unknown name '{target.name}.{attr}' (known: {known})"


@dataclass(frozen=True, eq=False)
class Expression:
    """A compiled runbook expression."""

    source: str
    _fn: Any = field(repr=False)

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """Evaluate against ``context``; failures become :class:`EvaluationError`."""
        try:
            return self._fn(**context)
        except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise EvaluationError(f"{self.source!r}: {exc}") from exc

    def test(self, context: Mapping[str, Any]) -> bool:
        """Evaluate and require a bool-like result."""
        value = self.evaluate(context)
        if isinstance(value, bool):
            return value
        try:
            return bool(value)
        except TemplateError as exc:
            raise EvaluationError(f"{self.source!r}: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Template:
    """A compiled runbook template (a plan line or a string var)."""

    source: str
    _tpl: Any = field(repr=False)

    def render(self, context: Mapping[str, Any]) -> str:
        """Render against ``context``; failures become :class:`EvaluationError`."""
        try:
            return str(self._tpl.render(**context))
        except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise EvaluationError(f"{self.source!r}: {exc}") from exc


class CompileError(ValueError):
    """An expression or template does not compile or uses undeclared names."""


def compile_expression(source: str, scope: Scope) -> Expression:
    """Compile ``source`` as an expression allowed to use the names in ``scope``."""
    try:
        parser = Parser(ENV, source, state="variable")
        tree = parser.parse_expression()
        if not parser.stream.eos:
            raise CompileError(
                f"bad expression {source!r}: unexpected {parser.stream.current.value!r} at the end"
            )
        fn = ENV.compile_expression(source, undefined_to_none=False)
    except TemplateError as exc:
        raise CompileError(f"bad expression {source!r}: {exc.message or exc}") from exc
    names = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load"}
    problems = list(_name_problems(tree, scope, names))
    if problems:
        raise CompileError("; ".join(problems))
    return Expression(source, fn)


def compile_template(source: str, scope: Scope) -> Template:
    """Compile ``source`` as a template allowed to use the names in ``scope``."""
    from jinja2 import meta  # noqa: PLC0415 - only needed at load time

    try:
        tree = ENV.parse(source)
        tpl = ENV.from_string(tree)
    except TemplateError as exc:
        raise CompileError(f"bad template {source!r}: {exc.message or exc}") from exc
    problems = list(_name_problems(tree, scope, set(meta.find_undeclared_variables(tree))))
    if problems:
        raise CompileError("; ".join(problems))
    return Template(source, tpl)


def failed_value(check_id: str, reason: str) -> Any:
    """The value a failed check has in a context: using it fails with ``reason``.

    ``checks.x is defined`` is false for it, so a runbook can handle failures on purpose.
    """
    return ENV.undefined(hint=f"check {check_id!r} failed: {reason}")


def is_template(value: str) -> bool:
    """Whether a string var contains template syntax (otherwise it is passed as is)."""
    return "{{" in value or "{%" in value
