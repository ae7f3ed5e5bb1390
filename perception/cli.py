"""Shared command-line plumbing: user mistakes become one line on stderr, never a traceback."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable

from perception.errors import PerceptionError


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(main(sys.argv[1:] if argv is None else argv) or 0)
    except PerceptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130


def parse_options(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON when they parse as JSON (numbers, true, lists), else strings."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PerceptionError(f"{what} option '{pair}' is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
