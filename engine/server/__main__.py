"""``python -m engine.server --config FILE``: the server without the CLI (tests, benchmarks)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.errors import EngineError
from engine.server.serve import serve
from engine.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    """Parse ``--config``, build settings from the environment and serve."""
    parser = argparse.ArgumentParser(prog="python -m engine.server")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = load_settings(Path.cwd(), os.environ)
    try:
        return serve(args.config, settings)
    except EngineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
