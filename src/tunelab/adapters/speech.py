"""Wav2Vec2 / HuBERT (transformers) as tunelab adapters for audio classification and regression.

Groups, from input to output: ``feature_encoder`` (the convolutional feature encoder on raw
waveforms), ``feature_projection`` (projection, positional convolution, input norm),
``layer.<i>`` (transformer layers) and ``head``. The feature encoder stays frozen by default
(``model.frozen_groups``), as in the wav2vec 2.0 paper's fine-tuning recipe.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from tunelab.adapters.groups import Adapter
from tunelab.adapters.hf import (PooledClassifier, add_lora, checkpoint_backbone, hf_groups, load_backbone, new_head, pool,
                                 resolve_checkpoint)
from tunelab.config.settings import BOOL, FRACTION, POSITIVE, checked
from tunelab.errors import TunelabError

SPEECH_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat")


class SpeechModel(PooledClassifier):
    """Backbone -> mean over real (unpadded) frames -> dropout -> new head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, dropout: float, pass_mask: bool):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.dropout = nn.Dropout(dropout)
        # Checkpoints with group-norm feature encoders (wav2vec2-base) were trained without an
        # attention mask and must not get one; the mask still decides which frames are pooled.
        self.pass_mask = pass_mask

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean over real frames that the head reads."""
        mask = inputs.get("attention_mask")
        out = self.backbone(inputs["input_values"], attention_mask=mask if self.pass_mask else None)
        hidden = out.last_hidden_state
        frames = self.backbone._get_feature_vector_attention_mask(hidden.shape[1], mask) if mask is not None else None
        return pool(hidden, frames, "mean")


def _feature_extractor(path: str | None, model_config):
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor

    if path is not None:
        try:
            return AutoFeatureExtractor.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError):
            pass  # a bare model folder: the standard wav2vec2 front end below
    # 16 kHz, zero-mean unit-variance per utterance: what wav2vec2 / HuBERT checkpoints expect
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=model_config.feat_extract_norm == "layer")


@checked("model")
def speech_adapter(
    num_outputs: int,
    path: str | None = None,
    pretrained: Annotated[bool, BOOL] = True,
    config: dict | None = None,
    config_overrides: dict | None = None,
    frozen_groups: list[str] | None = ("feature_encoder",),
    dropout: Annotated[float, FRACTION] = 0.1,
    head_init_std: Annotated[float, POSITIVE] = 0.02,
    lora_targets: list[str] | None = None,
    lora: dict | None = None,
) -> Adapter:
    """An audio classifier / regressor from a local Wav2Vec2 / HuBERT checkpoint (``path``) or
    a random model of an inline ``config`` (``model_type: wav2vec2`` + sizes)."""
    given, path = path, resolve_checkpoint(path) if path else None
    backbone, model_config, source = load_backbone(path, pretrained, config, config_overrides)
    source = f"{source} {given}" if given else source
    if model_config.model_type not in SPEECH_TYPES:
        raise TunelabError(f"model.path holds a {model_config.model_type!r} model; the speech adapter takes "
                           f"{', '.join(SPEECH_TYPES)} (text models: model=hf_text).")
    extractor = _feature_extractor(path, model_config)
    model = SpeechModel(backbone, new_head(model_config.hidden_size, num_outputs, head_init_std), dropout,
                        pass_mask=bool(getattr(extractor, "return_attention_mask", False)))
    note = add_lora(model, lora, lora_targets)
    stable = getattr(model_config, "do_stable_layer_norm", False)  # final norm runs after the layers
    groups = hf_groups(model, bottom=[("feature_extractor.", "feature_encoder"), ("", "feature_projection")],
                       top_extra=("encoder.layer_norm.",) if stable else ())
    frozen = tuple(frozen_groups or ())
    unknown = [g for g in frozen if g not in {g.name for g in groups}]
    if unknown:
        raise TunelabError(f"model.frozen_groups names unknown groups {unknown}; this model has {[g.name for g in groups]}.")
    return Adapter(
        model=model,
        groups=groups,
        data_config={"feature_extractor": extractor, "sampling_rate": int(extractor.sampling_rate)},
        description=f"transformers {type(backbone).__name__} ({source}, new {num_outputs}-output head{note}, "
                    f"{len(groups)} layer groups, always frozen: {', '.join(frozen) or 'none'})",
        modality="audio",
        features=SpeechModel.features, classify=SpeechModel.classify, head_side=("dropout", "head"),
        checkpointing=checkpoint_backbone,
        frozen_groups=frozen,
    )
