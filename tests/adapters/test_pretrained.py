"""The shipped weights really are ImageNet-pretrained, loaded through the normal adapter path."""

from __future__ import annotations

import pytest
import timm.data
import torch
from PIL import Image
from skimage import data as samples

from tunelab.adapters.timm import timm_adapter

COFFEE_CLASSES = {504: "coffee mug", 967: "espresso", 968: "cup"}
TABBY_CLASSES = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}


def _predict(adapter, image) -> torch.Tensor:
    cfg = adapter.data_config
    transform = timm.data.create_transform(**{k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")})
    with torch.no_grad():
        return adapter.model.eval()(transform(Image.fromarray(image)).unsqueeze(0)).softmax(-1)[0]


@pytest.mark.parametrize("image,expected", [(samples.coffee, COFFEE_CLASSES), (samples.chelsea, TABBY_CLASSES)])
def test_shipped_efficientnet_lite0_recognises_sample_photos(image, expected):
    adapter = timm_adapter("tf_efficientnet_lite0", num_outputs=1000, pretrained=True)
    assert "pretrained head kept" in adapter.description
    probs = _predict(adapter, image())
    assert int(probs.argmax()) in expected, f"top-1 {int(probs.argmax())} not in {expected}"
    assert float(probs[list(expected)].sum()) > 0.5


def test_random_init_does_not():
    adapter = timm_adapter("tf_efficientnet_lite0", num_outputs=1000, pretrained=False)
    probs = _predict(adapter, samples.coffee())
    assert float(probs[list(COFFEE_CLASSES)].sum()) < 0.05
