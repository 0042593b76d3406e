"""``tunelab-export``: a trained model as TorchScript, ONNX and (transformers) save_pretrained,
with its labels and preprocessing beside it, each format checked against PyTorch on real inputs.

    tunelab-export outputs/runs/<date>/checkpoints/epoch04.ckpt --out exported/digits
    tunelab-export models:/digits/1 --format onnx --out exported/digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelab.cli.common import one_line_errors, start
from tunelab.deploy.export import FORMATS, export_model


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="tunelab-export", description="Export a trained model for deployment, "
                                     "checked against PyTorch on real inputs (max abs difference reported).")
    parser.add_argument("source", help="a checkpoint (.ckpt) in a tunelab run folder, runs:/RUN_ID, or models:/NAME/VERSION")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    parser.add_argument("--format", action="append", choices=FORMATS, default=None,
                        help="onnx, torchscript, hf (repeatable; default: onnx and torchscript, plus hf for "
                        "text and speech models)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |exported - PyTorch| (default 1e-3)")
    parser.add_argument("--store", type=Path, default=None, help="MLflow SQLite store for runs:/ and models:/ sources")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    start("tunelab-export")
    args = parse_args(argv)
    with one_line_errors("tunelab-export"):
        meta = export_model(args.source, args.out, args.format, args.tolerance, args.store)
    for name, info in meta["formats"].items():
        diff = f"max |diff| vs PyTorch {info['max_abs_diff']:.2e}" if "max_abs_diff" in info else "saved"
        print(f"{name:12s} {args.out / info['file']}  {diff}")
    print(f"labels and preprocessing: {args.out / 'tunelab_export.json'}\n"
          f"label new inputs: tunelab-predict {args.out} <folder or CSV>")


if __name__ == "__main__":
    main()
