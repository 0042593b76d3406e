"""Values longer than MLflow's param limit never crash a run; the config artifact keeps them."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from tunelab.cli.train import train
from tunelab.tracking.run_records import flat_params
from tunelab.tracking.store import tracking_uri


def test_flat_params_clip_only_what_is_too_long(cfg_factory):
    cfg = cfg_factory(f"+notes={'x' * (MAX_PARAM_VAL_LENGTH + 50)}")
    params = flat_params(cfg)
    assert len(params["notes"]) == MAX_PARAM_VAL_LENGTH and params["notes"].endswith("...")
    assert params["optimizer.lr"] == str(cfg.optimizer.lr)


@pytest.mark.slow
def test_a_run_with_a_huge_value_finishes_and_keeps_it_in_config_yaml(cfg_factory, tmp_path):
    long_text = "y" * (2 * MAX_PARAM_VAL_LENGTH)
    # a real setting (an unknown top-level key is refused): a regex list, one pattern very long
    cfg = cfg_factory("strategy=regex", f"strategy.patterns=[bias,{long_text}]")
    train(cfg)
    client = MlflowClient(tracking_uri(cfg))
    run = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.patterns"].endswith("...")
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert long_text in open(config).read()


def test_the_ranks_that_log_nothing_still_refuse_a_name_run_does_not_have():
    """Ranks > 0 log to a NoRun: every Run method does nothing there, and a misspelt one fails
    as it would on rank 0 instead of passing silently."""
    from tunelab.tracking.runs import NoRun, Run

    run = NoRun()
    methods = [name for name in vars(Run) if not name.startswith("_") and callable(getattr(Run, name))]
    assert {"log_metrics", "set_tag", "fail", "log_artifact"} <= set(methods)
    for name in methods:
        if name != "lightning_logger":
            assert getattr(run, name)("any", key="value") is None
    assert run.lightning_logger() is False and run.run_id is None
    with pytest.raises(AttributeError, match="log_metric"):
        run.log_metric({"val/acc": 1.0})
