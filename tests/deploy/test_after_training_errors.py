"""Bad input to the after-training commands and the DDP launcher: one clear error, nothing started."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import compose_cfg
from tunelab.errors import TunelabError


def test_predict_names_what_is_wrong_with_its_inputs(tmp_path):
    from tunelab.deploy.exported import Exported, read_inputs

    with pytest.raises(TunelabError, match="not a tunelab export"):
        Exported(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="no image files"):
        read_inputs(tmp_path / "empty", {"modality": "image"}, None)
    with pytest.raises(TunelabError, match="text model labels a CSV"):
        read_inputs(tmp_path / "empty", {"modality": "text"}, None)
    pd.DataFrame({"body": ["fine"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(TunelabError, match="no column 'text'.*--column"):
        read_inputs(tmp_path / "t.csv", {"modality": "text"}, None)
    assert read_inputs(tmp_path / "t.csv", {"modality": "text"}, "body") == ["fine"]
    with pytest.raises(TunelabError, match="does not exist"):
        read_inputs(tmp_path / "missing.csv", {"modality": "text"}, None)
    pairs = {"modality": "text", "pairs": True}  # a model trained on text pairs needs the second text
    with pytest.raises(TunelabError, match=r"no column 'text_pair'.*--pair-column"):
        read_inputs(tmp_path / "t.csv", pairs, "body")
    pd.DataFrame({"text": ["a", "b"], "hypothesis": ["c", None]}).to_csv(tmp_path / "p.csv", index=False)
    assert read_inputs(tmp_path / "p.csv", pairs, None, "hypothesis") == [("a", "c")]  # an incomplete row is dropped


def test_eval_takes_data_overrides_only(tmp_path):
    from tunelab.deploy.evaluate import apply_data_overrides

    cfg = compose_cfg(tmp_path)
    with pytest.raises(TunelabError, match="data overrides only"):
        apply_data_overrides(cfg, ["optimizer.lr=1"])
    apply_data_overrides(cfg, ["data.batch_size=3"])
    assert cfg.data.batch_size == 3 and cfg.data.name == "mnist5k"  # the model's own data, edited
    # conf/eval.yaml composes them natively: Hydra itself refuses a misspelt key or a missing choice
    with pytest.raises(TunelabError, match=r"Could not override 'data\.batch_sise'"):
        apply_data_overrides(cfg, ["data.batch_sise=3"])
    with pytest.raises(TunelabError, match=r"Could not find 'data/nope'\. Available options in 'data': audio_csv, "):
        apply_data_overrides(cfg, ["data=nope"])
    with pytest.raises(TunelabError, match=r"needs data to evaluate on; \['~data'\] removed it"):
        apply_data_overrides(cfg, ["~data"])
    apply_data_overrides(cfg, ["data=image_folder", "data.source.root=/new/images"])
    assert cfg.data.name == "image_folder" and cfg.data.source.root == "/new/images"
    assert cfg.data.seed == cfg.seed and cfg.data.batch_size != 3  # another config, the run's seed


def test_ddp_settings_that_cannot_start_are_refused_before_any_rank(tmp_path, monkeypatch):
    from tunelab.engine.distributed import local_world_size, rank_processes

    for key in ("LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert local_world_size(compose_cfg(tmp_path, ["trainer=ddp_cpu", "trainer.devices=3"])) == 3
    assert local_world_size(compose_cfg(tmp_path, ["trainer=cpu"])) == 1
    with pytest.raises(TunelabError, match="trainer.devices must be a number"):
        local_world_size(compose_cfg(tmp_path, ["trainer=ddp_cpu", "trainer.devices=auto"]))
    cfg = compose_cfg(tmp_path, ["trainer=ddp_cpu", "trainer.num_nodes=2"])
    with pytest.raises(TunelabError, match="num_nodes > 1 needs a cluster launcher"):
        with rank_processes(cfg, tmp_path / "job"):
            pass
    assert not (tmp_path / "job" / "resolved_config.yaml").exists()


def test_text_model_rejects_an_unknown_pretrained_task(tmp_path):
    from tunelab.config import build

    cfg = compose_cfg(tmp_path, ["model=minilm", "model.pretrained_task=imagenet"])
    with pytest.raises(TunelabError, match="model.pretrained_task must be sentence_similarity or null, got .imagenet."):
        build(cfg.model, "model", num_outputs=3)
