"""Local weights only, read safely: checkpoints, safetensors, and the errors for bad files."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from tunelab.adapters.timm import timm_adapter
from tunelab.errors import TunelabError


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=7).state_dict()


def test_local_checkpoint_loads_backbone_and_replaces_mismatched_head(tmp_path, resnet_state):
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in resnet_state.items()}}, path)  # Lightning-style
    adapter = timm_adapter("resnet18", num_outputs=3, checkpoint=str(path))
    own = adapter.model.state_dict()
    assert torch.equal(own["conv1.weight"], resnet_state["conv1.weight"])
    assert torch.equal(own["layer4.1.bn2.running_var"], resnet_state["layer4.1.bn2.running_var"])
    assert own["fc.weight"].shape == (3, 512)  # a new head for 3 classes
    assert "new 3-output head" in adapter.description


def test_a_tunelab_checkpoint_serves_as_model_checkpoint(tmp_path, resnet_state):
    """A FineTuneModule checkpoint holds model.* plus the module's own buffers (target_mean/std)."""
    path = tmp_path / "epoch04.ckpt"
    state = {**{f"model.{k}": v for k, v in resnet_state.items()},
             "target_mean": torch.tensor(0.0), "target_std": torch.tensor(1.0)}
    torch.save({"state_dict": state, "epoch": 4}, path)
    adapter = timm_adapter("resnet18", num_outputs=7, checkpoint=str(path))
    assert torch.equal(adapter.model.state_dict()["fc.weight"], resnet_state["fc.weight"])  # 7 classes: head kept


def test_safetensors_checkpoint_keeps_matching_head(tmp_path, resnet_state):
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet_state.items()}, str(path))
    adapter = timm_adapter("resnet18", num_outputs=7, checkpoint=str(path))
    assert torch.equal(adapter.model.state_dict()["fc.weight"], resnet_state["fc.weight"])
    assert "pretrained head kept" in adapter.description


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
    with pytest.raises(TunelabError, match="weights_only=True"):
        timm_adapter("resnet18", num_outputs=3, checkpoint=str(path))


def test_corrupt_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TunelabError, match="cannot read"):
        timm_adapter("resnet18", num_outputs=3, checkpoint=str(bad))
    with pytest.raises(TunelabError, match="no file at"):
        timm_adapter("resnet18", num_outputs=3, checkpoint=str(tmp_path / "missing.pth"))


def test_checkpoint_of_another_architecture(tmp_path, resnet_state):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet_state, path)
    with pytest.raises(TunelabError, match="lack 80 tensors.*Check model.arch"):
        timm_adapter("resnet34", num_outputs=3, checkpoint=str(path))


def test_pretrained_without_local_weights_says_what_to_do():
    with pytest.raises(TunelabError, match="model.checkpoint=.*model.pretrained=false"):
        timm_adapter("resnet18", num_outputs=3, pretrained=True)


def test_unknown_architecture_suggests_names():
    with pytest.raises(TunelabError, match="Did you mean.*resnet18"):
        timm_adapter("resnet_18", num_outputs=3)


def test_checkpoint_with_foreign_keys(tmp_path, resnet_state):
    path = tmp_path / "extra.pth"
    torch.save({**resnet_state, "decoder.weight": torch.zeros(2)}, path)
    with pytest.raises(TunelabError, match=r"unexpected keys \['decoder.weight'\].*Check model.arch"):
        timm_adapter("resnet18", num_outputs=3, checkpoint=str(path))
