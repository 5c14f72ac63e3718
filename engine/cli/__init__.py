"""The ``remediate`` command line: the edge where input is read and errors become exit codes.

Exit codes: 0 all fixed/healthy (or valid), 1 something not fixed or failed,
2 invalid input, 3 engine fault; 130 and 143 when stopped by SIGINT or SIGTERM.  Commands
live in the modules beside this one; importing them registers them on
:data:`engine.cli.app.app` (cheaply: each command imports what it needs when it runs).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

import typer

from engine.cli import (  # noqa: F401 - registers commands
    approvals,
    audit,
    demo,
    distributed,
    route,
    runbooks,
    runs,
    serve,
)
from engine.cli.app import (
    EXIT_FAULT,
    EXIT_NOT_FIXED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    app,
)
from engine.errors import EngineError, RunbookError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["app", "main", "run_cli"]


class Terminated(BaseException):
    """SIGTERM reached the command: it unwinds as Ctrl-C does (a run is recorded interrupted).

    A ``BaseException``, like :class:`KeyboardInterrupt`: not an error of the engine's.
    """


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise Terminated


def run_cli(argv: Sequence[str]) -> int:
    """Run the CLI with ``argv``; return the exit code. Only here are errors caught broadly.

    SIGTERM (``kill``, systemd, a CI job's timeout) is turned into :class:`Terminated` while
    the command runs, unless the process was started with it ignored; without this, the
    process would end at once and leave its run recorded as still running.  Commands run
    with umask ``077`` (see :func:`engine.cli.app._root`); the caller's is restored after.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
    umask = os.umask(0o077)  # read it (the root callback sets the commands' own)
    os.umask(umask)
    try:
        return _run_cli(argv)
    finally:
        os.umask(umask)
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


def _run_cli(argv: Sequence[str]) -> int:
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
    except Terminated:
        _stderr().print("terminated")
        return EXIT_SIGTERM
    except Exception as exc:
        _stderr().print(f"internal error: {type(exc).__name__}: {exc}", markup=False)
        if os.environ.get("REMEDIATE_DEBUG"):
            raise
        return EXIT_FAULT
    if result == EXIT_SIGINT:  # Typer turns KeyboardInterrupt into this exit code, silently
        _stderr().print("interrupted")
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
