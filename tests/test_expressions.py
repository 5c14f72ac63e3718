"""The one sandboxed expression environment."""

from __future__ import annotations

import re

import pytest

from engine.expressions import (
    HOST_ATTRS,
    CompileError,
    EvaluationError,
    Scope,
    compile_expression,
    compile_template,
    failed_value,
)

SCOPE = Scope({"checks": frozenset({"a", "b"}), "params": frozenset({"p"}), "host": HOST_ATTRS})


def test_expression_evaluates_against_context() -> None:
    """An expression compares check values with params."""
    expr = compile_expression("checks.a < params.p and checks['b'] == 'x'", SCOPE)
    assert expr.test({"checks": {"a": 1, "b": "x"}, "params": {"p": 2}, "host": {}}) is True


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("checks.c > 1", "checks.c"),
        ("checks['c'] > 1", "checks.c"),
        ("params.q", "params.q"),
        ("host.address", "host.address"),
        ("lookup('pipe', 'id')", "lookup"),
        ("checks.a >", "bad expression"),
        ("checks.a }} {{ 1", "bad expression"),
    ],
)
def test_compile_rejects_unknown_names_and_syntax(source: str, needle: str) -> None:
    """Unknown names and syntax errors are compile-time errors."""
    with pytest.raises(CompileError, match=re.escape(needle)):
        compile_expression(source, SCOPE)


def test_sandbox_blocks_attribute_escapes() -> None:
    """Dunder access is refused by the sandbox at evaluation time."""
    expr = compile_expression("checks.a.__class__.__mro__", SCOPE)
    with pytest.raises(EvaluationError):
        expr.evaluate({"checks": {"a": 1, "b": 2}, "params": {}, "host": {}})


def test_sandbox_is_immutable() -> None:
    """Expressions cannot mutate the data they are given."""
    expr = compile_expression("checks.b.append(1)", SCOPE)
    data: dict[str, object] = {"a": 1, "b": []}
    with pytest.raises(EvaluationError):
        expr.evaluate({"checks": data, "params": {}, "host": {}})
    assert data["b"] == []


def test_failed_check_is_an_error_when_used_and_undefined_when_tested() -> None:
    """A failed check raises with its reason when used, and ``is defined`` is false."""
    context = {"checks": {"a": failed_value("a", "timed out"), "b": 1}, "params": {}, "host": {}}
    with pytest.raises(EvaluationError, match="check 'a' failed: timed out"):
        compile_expression("checks.a > 3", SCOPE).test(context)
    assert compile_expression("checks.a is defined", SCOPE).test(context) is False


def test_template_output_from_data_is_never_rendered_again() -> None:
    """Probe output containing template syntax is printed literally."""
    template = compile_template("found {{ checks.a }}", SCOPE)
    hostile = "{{ 7 * 6 }}{% for x in range(3) %}x{% endfor %}"
    assert template.render({"checks": {"a": hostile}, "params": {}, "host": {}}) == (
        f"found {hostile}"
    )


def test_filesizeformat_and_duration_filters() -> None:
    """Plan lines can format sizes and durations."""
    source = "{{ checks.a | filesizeformat }} in {{ checks.b | duration }}"
    template = compile_template(source, SCOPE)
    assert template.render({"checks": {"a": 2_500_000, "b": 5400}}) == "2.5 MB in 1h30m"
