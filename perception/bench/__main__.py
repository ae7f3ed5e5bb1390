"""``python -m perception.bench FAMILY [options]``: one module per benchmark family.

Each family module exposes ``main(argv: list[str]) -> int`` and writes JSON (and PNG figures
where a picture says more) under ``--out`` (default ``bench_results/FAMILY``).
"""

from __future__ import annotations

import importlib
import sys

FAMILIES = {
    "data": "perception.bench.data",
    "pretrain": "perception.bench.pretrain",
    "estimators": "perception.bench.estimators",
    "clustering": "perception.bench.clustering",
    "multi-mnist": "perception.bench.multi_mnist",
    "segmentation": "perception.bench.segmentation",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m perception.bench {{{','.join(FAMILIES)}}} [options]")
        return 0 if argv else 2
    family, rest = argv[0], argv[1:]
    if family not in FAMILIES:
        print(f"error: unknown benchmark '{family}'; valid: {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(FAMILIES[family])
    except ModuleNotFoundError as exc:
        if exc.name == FAMILIES[family]:
            print(f"error: benchmark '{family}' is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    from perception.cli import run_cli

    sys.exit(run_cli(main))
