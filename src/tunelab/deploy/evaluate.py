"""A trained model evaluated on any split of any data config, tracked in MLflow (``tunelab-eval``)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, open_dict

from tunelab.config import build
from tunelab.config.compose import compose_root
from tunelab.config.settings import check_call
from tunelab.deploy import tta
from tunelab.engine import evaluation
from tunelab.engine.trained import Predictor, load_adapter, resolve, store_client
from tunelab.errors import TunelabError
from tunelab.tracking import tag_names
from tunelab.tracking.links import run_link, shown_uri
from tunelab.tracking.runs import mlflow_run, user_store


@dataclass
class Evaluation:
    metrics: dict[str, float]
    title: str  # what was evaluated on what: the heading of the printed table
    logged: str | None = None  # where the MLflow run went, when it was logged

    def table(self) -> str:
        """One row per metric; a test-time augmented one (``test/tta/acc``) with its change from the plain one."""
        width = max(len(k) for k in self.metrics)
        rows = [f"{k.ljust(width)}  {v:.4f}{self._change(k, v)}" for k, v in self.metrics.items() if "/f1_class/" not in k]
        per_class = [(k.split("/f1_class/")[1], v) for k, v in self.metrics.items() if "/f1_class/" in k]
        if per_class:
            rows.append("F1 per class: " + ", ".join(f"{c} {v:.3f}" for c, v in per_class))
        return "\n".join([self.title, *rows])

    def _change(self, key: str, value: float) -> str:
        plain = self.metrics.get(key.replace("/tta/", "/", 1)) if "/tta/" in key else None
        return "" if plain is None else f"  ({value - plain:+.4f})"


TRAINED_DATA = "_trained"  # conf/eval.yaml's default data choice: the trained model's own data config


EVAL_SETTINGS = ("tta",)  # conf/eval.yaml's own settings a command line may change, besides the data


def apply_data_overrides(cfg, overrides: list[str]):
    """Compose conf/eval.yaml with ``overrides`` (``data=CHOICE``, ``data.KEY=VALUE``, ``tta=MODE``), the
    trained model's data config standing as the default choice of the data group, into ``cfg.data``.
    Returns the composed eval config, its settings checked (``tta``)."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    bad = [o for o, key in zip(overrides, keys) if not key.startswith("data") and key not in EVAL_SETTINGS]
    if bad:
        raise TunelabError(f"tunelab-eval takes data overrides only (data=CHOICE, data.KEY=VALUE), and tta=MODE; "
                           f"got {bad}.")
    ConfigStore.instance().store(group="data", name=TRAINED_DATA, node=OmegaConf.to_container(cfg.data))
    composed = compose_root("eval", overrides)
    if "data" not in composed:  # ~data: nothing left to evaluate on
        raise TunelabError(f"tunelab-eval needs data to evaluate on; {overrides} removed it. "
                           "Pick another with data=CHOICE instead.")
    # the run's seed and folders set as values, never spliced into override text: they come from
    # the stored config (data, not syntax; a folder name with a comma would be a sweep)
    for key in ("seed", "paths.root_dir", "paths.output_dir"):
        OmegaConf.update(composed, key, OmegaConf.select(cfg, key), merge=False)
    check_call(tta.requested, {"tta": composed.get("tta")}, "", closed=False)  # tta=flp: one line, before the model is built
    with open_dict(cfg):
        cfg.data = OmegaConf.create(OmegaConf.to_container(composed.data, resolve=True))
    return composed


def check_classes(model_classes: list[str], data_classes: list[str], data_name: str) -> None:
    if model_classes and list(model_classes) != list(data_classes):
        raise TunelabError(
            f"the model was trained on {len(model_classes)} classes {model_classes[:8]}{'...' if len(model_classes) > 8 else ''} "
            f"but data={data_name} has {len(data_classes)}: {list(data_classes)[:8]}{'...' if len(data_classes) > 8 else ''}. "
            "Evaluate on data with the same classes (same names, same order).")


def evaluate(source: str, overrides: list[str] = (), split: str = "test", store: Path | None = None,
             log: bool = True) -> Evaluation:
    """Evaluate ``source`` (a .ckpt, runs:/ID or models:/NAME/VERSION) on ``split`` of its own data or
    of the data ``overrides`` pick; logged as a run of ``<experiment>-eval`` unless ``log`` is false."""
    import torch


    with tempfile.TemporaryDirectory(prefix="tunelab-eval-") as tmp:
        client = store_client(store)
        trained = resolve(source, client, Path(tmp))
        settings = apply_data_overrides(trained.cfg, list(overrides))
        dm = build(trained.cfg.data, "data")
        mode = tta.requested(settings.get("tta"), dm.modality)
        dm.scan()
        if split not in dm.splits:
            raise TunelabError(f"--split {split!r}: data={dm.name} has splits {sorted(dm.splits)}.")
        if dm.task != trained.meta["task"]:
            raise TunelabError(f"the model does {trained.meta['task']} but data={dm.name} is {dm.task}.")
        if dm.task != "regression":
            check_classes(trained.classes, dm.classes, dm.name)
        adapter = load_adapter(trained)
        dm.set_model_data_config(adapter.data_config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = evaluation.predict(Predictor(adapter, dm.task), dm.loader(split), device)
        out.classes = dm.classes if dm.task != "regression" else []
        metrics = {f"{split}/{k}": v for k, v in evaluation.report(out, dm.task, f"{split}/", dm.threshold).items()}
        title = f"{source} on data={dm.name} split={split} ({len(out.targets)} samples)"
        if mode:
            metrics.update(_augmented(Predictor(adapter, dm.task), dm, split, mode, device))
            title += f", tta={mode} ({tta.MODES[mode]} views per image: {split}/tta/*)"
        result = Evaluation(metrics, title)
        if log:
            result.logged = _log(trained, source, split, result, out, Path(tmp), client.tracking_uri, mode)
    return result


def _augmented(predictor, dm, split: str, mode: str, device) -> dict[str, float]:
    """``<split>/tta/<metric>``: the report of the predictions averaged over ``mode``'s views (per-class F1 left to the plain report)."""
    out = tta.predict(predictor, dm, split, mode, device)
    out.classes = dm.classes if dm.task != "regression" else []
    found = evaluation.report(out, dm.task, f"{split}/tta/", dm.threshold)
    return {f"{split}/tta/{k}": v for k, v in found.items() if "f1_class/" not in k}


def _log(trained, source: str, split: str, result: Evaluation, out, tmp: Path, uri: str | None,
         mode: str | None = None) -> str:
    """An MLflow run in ``<experiment>-eval`` (tag ``tunelab.kind=eval``), so a sweep's comparison
    holds training runs only, in the store the user chose (``uri``: --store, MLFLOW_TRACKING_URI
    or the default store; never one a stored config names)."""
    name = f"eval {split} of {trained.run_id or Path(source).name}"
    with mlflow_run(user_store(trained.cfg), run_name=name, kind="eval", uri=uri) as run:
        run.set_tag(tag_names.EVAL_SOURCE, source)
        if trained.run_id:
            run.set_tag(tag_names.EVAL_OF, trained.run_id)  # links the evaluation to its training run
        if mode:
            run.set_tag(tag_names.EVAL_TTA, mode)
        run.log_metrics(result.metrics)
        if out.classes and trained.meta["task"] == "multilabel":  # no single predicted class: no confusion
            run.log_text(evaluation.class_key_table(out.classes, f"{split}/"), "class_metric_keys.json")
        elif out.classes:
            run.log_confusion(evaluation.confusion(out), out.classes)
            run.log_text(evaluation.class_key_table(out.classes, f"{split}/"), "class_metric_keys.json")
            run.log_artifact(evaluation.reliability_plot(out, tmp / "reliability.png"))
        else:
            run.log_artifact(evaluation.residual_plot(out, tmp / "residuals.png"))
    return (f"logged as MLflow run {run.run_id} in experiment {run.experiment_name!r} of {shown_uri(run.tracking_uri)}: "
            f"{run_link(run.tracking_uri, run.experiment_id, run.run_id)}")
