"""The pieces of a sweep, fast: search spaces, the trials table, slots, sweeper configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.tunelab_optuna_sweeper.study import direction, distribution, pruner, sampler
from tunelab.sweep import summary
from tunelab.sweep.trial import claim_slot
from tunelab.tracking.sweep_job import Job, override_items
from conftest import REPO, compose_cfg


def parse(text: str):
    return OverridesParser.create().parse_overrides([text])[0]


@pytest.mark.parametrize("text, expected", [
    ("strategy=full,gradual", CategoricalDistribution(["full", "gradual"])),
    ("data.batch_size=choice(16,32)", CategoricalDistribution([16, 32])),
    ("trainer.max_epochs=range(2,6)", IntDistribution(2, 5)),
    ("module.layer_decay=interval(0.5,1.0)", FloatDistribution(0.5, 1.0)),
    ("optimizer.lr=tag(log,interval(1e-5,1e-2))", FloatDistribution(1e-5, 1e-2, log=True)),
    ("data.batch_size=int(interval(8,64))", IntDistribution(8, 64)),
    ("data.batch_size=interval(8,64)", FloatDistribution(8.0, 64.0)),
])
def test_sweep_syntax_becomes_optuna_distributions(text, expected):
    assert distribution(parse(text)) == expected


def test_sweeper_settings_are_checked_with_the_key_to_fix():
    assert direction("max") == "maximize" and direction("min") == "minimize"
    with pytest.raises(ValueError, match="hydra.sweeper.direction"):  # Hydra may import the plugin twice
        direction("up")
    with pytest.raises(ValueError, match="hydra.sweeper.sampler.name.*tpe"):
        sampler({"name": "bayes"})
    assert type(pruner({"name": "successive_halving", "min_resource": 1})).__name__ == "SuccessiveHalvingPruner"
    assert type(pruner(None)).__name__ == "NopPruner"
    assert type(sampler({"name": "tpe", "seed": 1})).__name__ == "TPESampler"


def test_a_setting_the_chosen_pruner_does_not_take_is_refused_with_what_it_takes():
    with pytest.raises(ValueError, match=r"hydra.sweeper.pruner: the successive_halving pruner takes .*min_resource.*"
                                         r"got min_resorce"):
        pruner({"name": "successive_halving", "min_resorce": 1})
    # the median pruner's defaults (conf/hydra/sweeper/optuna.yaml) merge into any pruner: dropped
    assert type(pruner({"name": "hyperband", "n_startup_trials": 3, "n_warmup_steps": 1})).__name__ == "HyperbandPruner"


@pytest.mark.parametrize("search", sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml")))
def test_every_shipped_search_builds_its_sampler_and_pruner(tmp_path, search):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tunelab.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={search}", f"paths.root_dir={tmp_path}"],
                      return_hydra_config=True)
    nodes = {key: OmegaConf.to_container(cfg.hydra.sweeper[key], resolve=True) for key in ("pruner", "sampler")}
    assert type(pruner(nodes["pruner"])).__module__.startswith("optuna.pruners")
    assert type(sampler(nodes["sampler"])).__module__.startswith("optuna.samplers")


def test_hparams_search_composes_the_optuna_sweeper(tmp_path):
    from hydra import compose, initialize_config_dir

    from tunelab.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=lr_and_strategy", f"paths.root_dir={tmp_path}"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.study_name == "lr_and_strategy"
    assert sweeper.direction == "max" and sweeper.storage.endswith("outputs/optuna/lr_and_strategy.journal")
    assert distribution(parse(f"optimizer.lr={sweeper.params['optimizer.lr']}")).log
    assert cfg.hydra.callbacks.tunelab_sweep._target_ == "tunelab.sweep.parent.SweepTracker"


# tunelab's launcher files, and the plugins' own configs that the docs and tests name
LAUNCHERS = sorted({p.stem for p in (REPO / "conf" / "hydra" / "launcher").glob("*.yaml")} | {"joblib", "submitit_local"})


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_configs_compose_and_name_an_installed_launcher(tmp_path, launcher):
    from hydra import compose, initialize_config_dir
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    from tunelab.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert issubclass(get_class(cfg.hydra.launcher._target_), Launcher)  # imports it: a typo or a missing extra fails


def trial(name, status, value, params, start):
    return summary.Trial(run_id=name, name=name, status=status, params=params, value=value, seconds=30.0,
                         label=name, start=start)


def test_trials_table_ranks_by_the_objective_and_shows_what_varied():
    trials = [
        trial("#0", "FINISHED", 0.80, {"optimizer.lr": "0.001", "debug": "smoke"}, 1),
        trial("#1", "FINISHED", 0.90, {"optimizer.lr": "0.0003", "debug": "smoke"}, 2),
        trial("#2", "PRUNED", 0.10, {"optimizer.lr": "0.1", "debug": "smoke"}, 3),
        trial("#3", "FAILED", None, {"optimizer.lr": "-1", "debug": "smoke"}, 4),
        trial("#4", "FINISHED", 0.90, {"optimizer.lr": "0.0002", "debug": "smoke"}, 5),
    ]
    assert summary.varied_keys(trials) == ["optimizer.lr"]
    assert summary.best_trial(trials, "max").name == "#1"  # ties go to the earlier trial
    assert summary.best_trial(trials, "min").name == "#0"  # pruned and failed trials never win
    lines = summary.format_table(trials, "val/acc", "max").splitlines()
    assert lines[0].split() == ["rank", "run", "optimizer.lr", "val/acc", "status", "time"]
    assert [line.split()[1] for line in lines[2:]] == ["#1", "#4", "#0", "#2", "#3"]
    assert lines[-1].split()[3:] == ["-", "FAILED", "30", "s"]


def test_override_items_strip_prefixes():
    assert override_items(["+a.b=1", "strategy=full", "x=y=z"]) == {"a.b": "1", "strategy": "full", "x": "y=z"}


def test_parallel_jobs_never_share_a_slot(tmp_path):
    """A slot is a file lock held for the worker's life: a second process gets the next one."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tunelab.tracking.sweep_job import Job; from tunelab.sweep.trial import claim_slot;"
        f"print(claim_slot(Job(0, {{}}, {str(tmp_path)!r}, 'JoblibLauncher', 2), 2), flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert claim_slot(Job(1, {}, str(tmp_path), "JoblibLauncher", 2), 2) == 1
    finally:
        holder.kill()
        holder.wait()


def test_a_single_run_is_not_a_sweep_job(tmp_path):
    from tunelab.tracking.sweep_job import current_job

    compose_cfg(tmp_path)
    assert current_job() is None


@pytest.mark.parametrize("trainer, expected", [
    (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], (4, 4, 2)),
    (["trainer=ddp", "trainer.devices=[0,1]"], (2, 2, 1)),
    (["trainer=ddp_cpu", "trainer.devices=2"], (None, 2, 1)),  # a CPU trainer asks for no GPUs
    (["trainer=cpu"], (None, 1, 1)),
])
def test_slurm_launcher_asks_for_the_trainers_gpus_nodes_and_one_task_per_gpu(tmp_path, trainer, expected):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tunelab.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *trainer, f"paths.root_dir={tmp_path}"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == expected
    assert launcher["timeout_min"] > 0
