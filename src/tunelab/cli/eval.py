"""``tunelab-eval``: evaluate a trained model on any split of any data config, tracked in MLflow.

    tunelab-eval outputs/runs/<date>/checkpoints/epoch04.ckpt          # its own test split
    tunelab-eval runs:/<run id> --split val
    tunelab-eval models:/digits/1 data=image_folder data.source.root=/new/images --split test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.tracking import tag_names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tunelab-eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="OVERRIDES use Hydra syntax: data=CHOICE picks another data config from conf/data/, "
        "data.KEY=VALUE changes one setting. The model's classes must match the data's.")
    parser.add_argument("source", help="a checkpoint (.ckpt) in a tunelab run folder, runs:/RUN_ID, or models:/NAME/VERSION")
    parser.add_argument("overrides", nargs="*", help="data=CHOICE and data.KEY=VALUE overrides")
    parser.add_argument("--split", default="test", help="train, val or test (default test)")
    parser.add_argument("--store", type=Path, default=None,
                        help="the MLflow SQLite store to read runs:/ and models:/ from "
                        "(default: MLFLOW_TRACKING_URI, else ./outputs/mlflow.db)")
    parser.add_argument("--no-log", action="store_true", help="print the metrics, log nothing to MLflow")
    # intermixed: overrides may follow the options too (runs:/ID --store S data.KEY=VALUE)
    return parser.parse_intermixed_args(argv)


def apply_data_overrides(cfg, overrides: list[str]) -> None:
    """``data=CHOICE`` composes that data config from conf/; ``data.KEY=VALUE`` edits the run's."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from tunelab.config import conf_dir

    bad = [o for o in overrides if not o.split("=", 1)[0].lstrip("+").startswith("data")]
    if bad:
        raise TunelabError(f"tunelab-eval takes data overrides only (data=CHOICE, data.KEY=VALUE); got {bad}.")
    if not any(o.startswith("data=") for o in overrides):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        # Hydra's own parser: data.batch_size=3 is the int 3, as on tunelab-train's command line
        for override in OverridesParser.create().parse_overrides(overrides):
            OmegaConf.update(cfg, override.key_or_group, override.value(), force_add=True)
        return
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        composed = compose("train", overrides=list(overrides))
    # the run's seed and folders set as values, never spliced into override text: they come from
    # the stored config (data, not syntax; a folder name with a comma would be a sweep)
    for key in ("seed", "paths.root_dir", "paths.output_dir"):
        OmegaConf.update(composed, key, OmegaConf.select(cfg, key), merge=False)
    with open_dict(cfg):
        cfg.data = OmegaConf.create(OmegaConf.to_container(composed.data, resolve=True))


def check_classes(model_classes: list[str], data_classes: list[str], data_name: str) -> None:
    if model_classes and list(model_classes) != list(data_classes):
        raise TunelabError(
            f"the model was trained on {len(model_classes)} classes {model_classes[:8]}{'...' if len(model_classes) > 8 else ''} "
            f"but data={data_name} has {len(data_classes)}: {list(data_classes)[:8]}{'...' if len(data_classes) > 8 else ''}. "
            "Evaluate on data with the same classes (same names, same order).")


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from tunelab.config import build
    from tunelab.engine import evaluation
    from tunelab.engine.trained import Predictor, load_adapter, resolve, store_client

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="tunelab-eval-") as tmp:
        client = store_client(args.store)
        trained = resolve(args.source, client, Path(tmp))
        apply_data_overrides(trained.cfg, args.overrides)
        dm = build(trained.cfg.data, "data").scan()
        if args.split not in dm.splits:
            raise TunelabError(f"--split {args.split!r}: data={dm.name} has splits {sorted(dm.splits)}.")
        if dm.task != trained.meta["task"]:
            raise TunelabError(f"the model does {trained.meta['task']} but data={dm.name} is {dm.task}.")
        if dm.task == "classification":
            check_classes(trained.classes, dm.classes, dm.name)
        adapter = load_adapter(trained)
        dm.set_model_data_config(adapter.data_config)
        loader = dm._loader(args.split, training=False)
        out = evaluation.predict(Predictor(adapter, dm.task), loader, "cuda" if torch.cuda.is_available() else "cpu")
        out.classes = dm.classes if dm.task == "classification" else []
        metrics = {f"{args.split}/{k}": v for k, v in evaluation.report(out, dm.task, f"{args.split}/").items()}
        print(_table(metrics, f"{args.source} on data={dm.name} split={args.split} ({len(out.targets)} samples)"))
        if not args.no_log:
            _log(trained, args, metrics, out, dm.task, Path(tmp), client.tracking_uri)
    return metrics


def _table(metrics: dict[str, float], title: str) -> str:
    width = max(len(k) for k in metrics)
    rows = [f"{k.ljust(width)}  {v:.4f}" for k, v in metrics.items() if "/f1_class/" not in k]
    per_class = [(k.split("/f1_class/")[1], v) for k, v in metrics.items() if "/f1_class/" in k]
    if per_class:
        rows.append("F1 per class: " + ", ".join(f"{c} {v:.3f}" for c, v in per_class))
    return "\n".join([title, *rows])


def _log(trained, args, metrics, out, task: str, tmp: Path, uri: str | None) -> None:
    """An MLflow run in ``<experiment>-eval`` (tag ``tunelab.kind=eval``), so a sweep's comparison
    holds training runs only, in the store the user chose (``uri``: --store, MLFLOW_TRACKING_URI
    or the default store; never one a stored config names)."""
    from tunelab.engine import evaluation
    from tunelab.tracking.links import run_link, shown_uri
    from tunelab.tracking.runs import mlflow_run, user_store

    name = f"eval {args.split} of {trained.run_id or Path(args.source).name}"
    with mlflow_run(user_store(trained.cfg), run_name=name, kind="eval", uri=uri) as run:
        run.set_tag(tag_names.EVAL_SOURCE, args.source)
        if trained.run_id:
            run.set_tag(tag_names.EVAL_OF, trained.run_id)  # links the evaluation to its training run
        run.log_metrics(metrics)
        if task == "classification":
            run.log_confusion(evaluation.confusion(out), out.classes)
            run.log_text(evaluation.class_key_table(out.classes, f"{args.split}/"), "class_metric_keys.json")
            run.log_artifact(evaluation.reliability_plot(out, tmp / "reliability.png"))
        else:
            run.log_artifact(evaluation.residual_plot(out, tmp / "residuals.png"))
    print(f"logged as MLflow run {run.run_id} in experiment {run.experiment_name!r} of {shown_uri(run.tracking_uri)}: "
          f"{run_link(run.tracking_uri, run.experiment_id, run.run_id)}")


def main(argv: list[str] | None = None) -> None:
    from tunelab.umask import set_for_cli

    set_for_cli("tunelab-eval")  # private files (tunelab/umask.py)
    args = parse_args(argv)
    try:
        evaluate(args)
    except TunelabError as err:
        print(f"tunelab-eval: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
