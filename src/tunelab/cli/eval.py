"""``tunelab-eval``: evaluate a trained model on any split of any data config, tracked in MLflow.

    tunelab-eval outputs/runs/<date>/checkpoints/epoch04.ckpt          # its own test split
    tunelab-eval runs:/<run id> --split val
    tunelab-eval models:/digits/1 data=image_folder data.source.root=/new/images --split test
    tunelab-eval runs:/<run id> tta=flip_crops          # test/tta/* beside test/*: test-time augmentation
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelab.cli.common import one_line_errors, start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tunelab-eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="OVERRIDES use Hydra syntax: data=CHOICE picks another data config from conf/data/, "
        "data.KEY=VALUE changes one setting. The model's classes must match the data's. "
        "tta=flip|crops|flip_crops (images) also reports <split>/tta/* metrics, averaged over flipped or "
        "cropped views of each image (conf/eval.yaml).")
    parser.add_argument("source", help="a checkpoint (.ckpt) in a tunelab run folder, runs:/RUN_ID, or models:/NAME/VERSION")
    parser.add_argument("overrides", nargs="*", help="data=CHOICE and data.KEY=VALUE overrides, tta=MODE")
    parser.add_argument("--split", default="test", help="train, val or test (default test)")
    parser.add_argument("--store", type=Path, default=None,
                        help="the MLflow SQLite store to read runs:/ and models:/ from "
                        "(default: MLFLOW_TRACKING_URI, else ./outputs/mlflow.db)")
    parser.add_argument("--no-log", action="store_true", help="print the metrics, log nothing to MLflow")
    # intermixed: overrides may follow the options too (runs:/ID --store S data.KEY=VALUE)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    start("tunelab-eval")
    args = parse_args(argv)
    with one_line_errors("tunelab-eval"):
        from tunelab.deploy.evaluate import evaluate

        result = evaluate(args.source, args.overrides, args.split, args.store, log=not args.no_log)
    print(result.table())
    if result.logged:
        print(result.logged)


if __name__ == "__main__":
    main()
