"""``python -m engine.server --config FILE``: the server without the CLI (tests, benchmarks)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.errors import EngineError
from engine.logopts import LogFormat, LogLevel
from engine.server.serve import serve
from engine.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    """Parse ``--config`` and the log options, build settings from the environment and serve."""
    parser = argparse.ArgumentParser(prog="python -m engine.server")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--log-format", type=LogFormat, choices=list(LogFormat), default="auto")
    parser.add_argument("--log-level", type=LogLevel, choices=list(LogLevel), default="info")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)
    settings = load_settings(Path.cwd(), os.environ)
    try:
        return serve(
            args.config,
            settings,
            log_format=args.log_format,
            log_level=args.log_level,
            access_log=args.access_log,
        )
    except EngineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
