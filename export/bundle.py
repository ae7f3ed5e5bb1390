"""``python -m export.bundle``: (re)export every bundled checkpoint ``perception/pretrained/NAME.pt``
to ``NAME.onnx`` next to it.

Safe to rerun whenever a checkpoint is added or retrained: every ``.pt`` is exported again
(the model code may have changed too), each file is replaced atomically and only after it
passes verification, and one failing checkpoint does not stop the others (the exit status is 1
if any failed; its previous ``.onnx``, if any, is left as it was).
"""

from __future__ import annotations

import argparse

from perception.cli import run_cli
from perception.errors import PerceptionError
from perception import pretrained


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME", help="bundled names to export (default: all)")
    args = p.parse_args(argv)

    from export.onnx_export import export_onnx

    available = pretrained.bundled_names()
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        raise PerceptionError(
            f"no bundled checkpoint {', '.join(unknown)}; bundled: {', '.join(available) or '(none)'}"
        )
    names = args.names or available
    if not names:
        print(f"no bundled checkpoints (*.pt) in {pretrained.PRETRAINED_DIR}")
        return 0
    failed = []
    for name in names:
        try:
            directory = pretrained.PRETRAINED_DIR
            result = export_onnx(directory / f"{name}.pt", directory / f"{name}.onnx", overwrite=True)
        except PerceptionError as exc:
            failed.append(name)
            print(f"{name}: FAILED: {exc}")
            continue
        print(f"{name}: {result.summary()}")
    if failed:
        print(f"{len(failed)} of {len(names)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
