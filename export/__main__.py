"""``python -m export NAME_OR_PATH --out FILE.onnx``: one verified, self-contained ONNX file.

NAME_OR_PATH is a bundled encoder name (``vae``...), a checkpoint file or a run directory. The
file is written only if the ONNX checker passes and onnxruntime matches PyTorch (max absolute
difference <= 1e-4 on every output at batch sizes 1, 3 and 64).
"""

from __future__ import annotations

import argparse

from perception.cli import run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    p.add_argument("encoder", metavar="NAME_OR_PATH", help="bundled encoder name, checkpoint file or run directory")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)

    from perception import resolve_encoder_path

    source = resolve_encoder_path(args.encoder)  # a wrong name fails before torch is imported

    from export.onnx_export import export_onnx

    print(export_onnx(source, args.out, overwrite=args.overwrite).summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
