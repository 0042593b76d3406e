"""``tunelab-monitor``: is a batch of new production inputs still what the model was trained on?

    tunelab-monitor models:/digits/1 incoming_images/
    tunelab-monitor runs:/<run id> new_reviews.csv --column review

Compares the new inputs with the training data's reference split (``--reference val``) on
three signals: the distribution of predicted classes (PSI), the shift of the representation
the head reads (distance between mean embeddings in units of the reference spread), and the
drop in mean confidence. Writes a PNG report, logs it to MLflow (experiment ``<name>-monitor``,
tag ``tunelab.monitor_of``), and exits 0 when the batch looks like the training data, 3 when
re-training is recommended.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunelab.cli.common import one_line_errors, start
from tunelab.deploy.monitor import THRESHOLDS, monitor

RETRAIN_EXIT = 3


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="tunelab-monitor", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog=f"Exit status: 0 = looks like the training data, {RETRAIN_EXIT} = "
                                     "re-training recommended, 2 = bad input.")
    parser.add_argument("source", help="a checkpoint (.ckpt) in a tunelab run folder, runs:/RUN_ID, or models:/NAME/VERSION")
    parser.add_argument("inputs", type=Path, help="new inputs: a folder of images / audio files, or a CSV")
    parser.add_argument("--column", default=None, help="the CSV column with the inputs (default: text or path)")
    parser.add_argument("--reference", default="val", help="the training data split to compare with (default val)")
    for key, value in THRESHOLDS.items():
        name = key.split("/")[1].replace("_", "-")
        parser.add_argument(f"--max-{name}", type=float, default=value, help=f"threshold (default {value})")
    parser.add_argument("--store", type=Path, default=None, help="MLflow SQLite store for runs:/ and models:/ sources")
    parser.add_argument("--no-log", action="store_true", help="print the verdict, log nothing to MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    start("tunelab-monitor")
    args = parse_args(argv)
    limits = {k: getattr(args, f"max_{k.split('/')[1]}") for k in THRESHOLDS}
    with one_line_errors("tunelab-monitor"):
        metrics, alarms = monitor(args.source, args.inputs, args.column, args.reference, limits, args.store,
                                  log=not args.no_log)
    for key in THRESHOLDS:
        print(f"{key.split('/')[1]:18s} {metrics[key]:.3f}")
    if alarms:
        print("re-training recommended: " + "; ".join(alarms))
        sys.exit(RETRAIN_EXIT)
    print(f"no shift beyond the thresholds ({int(metrics['monitor/samples'])} inputs)")


if __name__ == "__main__":
    main()
