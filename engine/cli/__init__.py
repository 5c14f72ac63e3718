"""The ``remediate`` command line: the edge where input is read and errors become exit codes.

Exit codes: 0 all fixed/healthy (or valid), 1 something not fixed or failed,
2 invalid input, 3 engine fault.  Commands live in the modules beside this one;
importing them registers them on :data:`engine.cli.app.app` (cheaply: each command imports
what it needs when it runs).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import typer

from engine.cli import approvals, audit, runbooks, runs, serve  # noqa: F401 - registers commands
from engine.cli.app import EXIT_FAULT, EXIT_NOT_FIXED, EXIT_OK, app
from engine.errors import EngineError, RunbookError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["app", "main", "run_cli"]


def run_cli(argv: Sequence[str]) -> int:
    """Run the CLI with ``argv``; return the exit code. Only here are errors caught broadly."""
    try:
        result = app(args=list(argv), prog_name="remediate", standalone_mode=False)
    except RunbookError as exc:
        from engine.cli.render import print_problems

        print_problems(_stderr(), exc.problems)
        return exc.exit_code
    except EngineError as exc:
        _stderr().print(f"error: {exc}", markup=False)
        return exc.exit_code
    except typer.Abort:
        _stderr().print("aborted")
        return EXIT_NOT_FIXED
    except typer.TyperException as exc:  # usage errors (bad option, missing argument, help)
        _show(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        _stderr().print("interrupted")
        return 130
    except Exception as exc:
        _stderr().print(f"internal error: {type(exc).__name__}: {exc}", markup=False)
        if os.environ.get("REMEDIATE_DEBUG"):
            raise
        return EXIT_FAULT
    return result if isinstance(result, int) else EXIT_OK


def _stderr() -> Console:
    """Rich on stderr, for the one line an error gets (Rich is imported when one is shown)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _show(exc: typer.TyperException) -> None:
    """Show a usage error as Typer would: usage line, hint and message (or the help text)."""
    show = getattr(exc, "show", None)  # Typer's click exceptions format themselves
    if callable(show):
        show()
    else:  # pragma: no cover - every exception Typer raises has show()
        _stderr().print(f"Error: {exc.format_message()}", markup=False)


def main() -> None:
    """Console-script entry point."""
    code = run_cli(sys.argv[1:])
    # The process ends now.  Without this, the interpreter's last garbage collections walk
    # every object the imports made (pydantic, Rich, ansible-runner: ~50,000 containers,
    # 50-90 ms) only to free memory the OS reclaims anyway.  Frozen objects are skipped by
    # those collections; atexit handlers, stream flushing and module teardown still run, and
    # the commands have closed their files, the audit log and the state store themselves.
    gc.freeze()
    sys.exit(code)
