"""``tunelab-predict``: label a folder or a CSV of new inputs with an exported model.

    tunelab-predict exported/digits new_images/ --out predictions.csv
    tunelab-predict exported/reviews reviews.csv --column review
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunelab.cli.common import one_line_errors, start


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="tunelab-predict", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("export", type=Path, help="a folder written by tunelab-export")
    parser.add_argument("inputs", type=Path, help="a folder of images / audio files, or a CSV (column path or text)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default predictions.csv)")
    parser.add_argument("--column", default=None, help="the CSV column with the inputs (default: text or path)")
    parser.add_argument("--pair-column", default="text_pair",
                        help="the CSV column with the second text, for a model trained on text pairs (default text_pair)")
    parser.add_argument("--runtime", choices=("auto", "onnx", "torchscript"), default="auto",
                        help="auto: ONNX Runtime when model.onnx exists, else TorchScript")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    start("tunelab-predict")
    args = parse_args(argv)
    with one_line_errors("tunelab-predict"):
        from tunelab.deploy.exported import Exported, label_inputs, read_inputs

        model = Exported(args.export, args.runtime)
        items = read_inputs(args.inputs, model.meta["preprocess"], args.column, args.pair_column)
        result = label_inputs(model, items, args.batch_size, progress=sys.stderr.isatty())
    result.to_csv(args.out, index=False)
    summary = result["label"].value_counts().head(5).to_dict() if "label" in result else {}
    print(f"labelled {len(result)} inputs with {model.runtime} -> {args.out}" + (f"  (most frequent: {summary})" if summary else ""))


if __name__ == "__main__":
    main()
