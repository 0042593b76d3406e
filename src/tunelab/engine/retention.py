"""What fine-tuning cost the pretrained model: weight drift per layer group and representation
similarity (linear CKA) between the pretrained and the fine-tuned features.

The pretrained model is a copy taken before the first step (``snapshot``). Features are the
head's input (the pooled representation every adapter feeds its new head), captured with a
forward hook, so timm, text and speech models are measured the same way.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from typing import Annotated

import numpy as np
import torch
from torch import nn

from tunelab.config.settings import BOOL, integer, reads


@reads("retention", noun="retention")
def retention_settings(enabled: Annotated[bool, BOOL] = True, samples: Annotated[int, integer(1)] = 256,
                       natural_images: Annotated[int | None, integer(1, null=True)] = None) -> None:
    """``retention`` in conf/train.yaml: whether to measure, on how many test samples (CKA), and on
    how many of the natural images (ImageNet agreement; null = all 220)."""


def snapshot(model: nn.Module) -> nn.Module:
    """A frozen copy of the model as it is now (before fine-tuning): costs one model of memory."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def head_module(model: nn.Module, head_param_names) -> nn.Module:
    """The module that owns the head's parameters (e.g. ``classifier`` or ``head``)."""
    prefixes = {name.rsplit(".", 1)[0] for name in head_param_names}
    common = min(prefixes, key=len)
    return model.get_submodule(common)


@torch.no_grad()
def forward_with_features(model: nn.Module, head_param_names, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(the representation the head reads, the model's output) for a batch of model inputs."""
    captured = []
    hook = head_module(model, head_param_names).register_forward_hook(
        lambda module, args, output: captured.append(args[0].detach().flatten(1).float()))
    try:
        output = model.eval()(inputs)
    finally:
        hook.remove()
    return captured[0], output


def features(model: nn.Module, head_param_names, inputs) -> torch.Tensor:
    return forward_with_features(model, head_param_names, inputs)[0]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment (Kornblith et al., 2019): 1.0 = same representation up to
    rotation and scale, 0 = unrelated. Rows are samples."""
    x = (x - x.mean(0, keepdim=True)).double()
    y = (y - y.mean(0, keepdim=True)).double()
    cross = (y.T @ x).norm() ** 2
    norm = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / norm) if norm > 0 else float("nan")


def weight_drift(before: nn.Module, after: nn.Module, groups) -> dict[str, float]:
    """Relative L2 change ``||w - w0|| / ||w0||`` per layer group, and over the whole backbone."""
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    drift, total_diff, total_ref = {}, 0.0, 0.0
    for group in groups:
        if group.name == "head":  # a new head has no pretrained weights to drift from
            continue
        diff = sum(float((new[n].detach().cpu() - old[n].cpu()).pow(2).sum()) for n in group.param_names)
        ref = sum(float(old[n].pow(2).sum()) for n in group.param_names)
        drift[group.name] = (diff / ref) ** 0.5 if ref > 0 else 0.0
        total_diff, total_ref = total_diff + diff, total_ref + ref
    drift["backbone"] = (total_diff / total_ref) ** 0.5 if total_ref > 0 else 0.0
    return drift


# scikit-image's sample photos and the ImageNet classes that name what they show.
IMAGENET_PHOTOS = {
    "coffee": {967, 968, 504},        # espresso, cup, coffee mug
    "chelsea": {281, 282, 285},       # tabby, tiger cat, Egyptian cat
    "rocket": {657, 744, 812},        # missile, projectile, space shuttle
    "stereo_motorcycle": {665, 670},  # moped, motor scooter
}


# scikit-image's natural sample images, on disk with the package (its synthetic ones, the horse
# silhouette, the logo and ``cat``, an alias of chelsea, are left out; a few need a download).
NATURAL_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page",
                  "retina", "rocket", "stereo_motorcycle", "text")


# the keys of a timm data config that make its ImageNet evaluation transform
EVAL_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")


def _eval_transform(data_config: dict):
    from timm.data import create_transform

    return create_transform(**{k: data_config[k] for k in EVAL_KEYS if k in data_config})


def _photo_arrays(name: str) -> list[np.ndarray]:
    import skimage.data

    array = getattr(skimage.data, name)()
    return list(array[:2]) if name == "stereo_motorcycle" else [array]  # (left, right, disparity)


def _rgb(array: np.ndarray):
    from PIL import Image

    if array.dtype != np.uint8:  # lfw_subset: floats in 0..1
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def imagenet_photos(data_config: dict):
    """(batch, accepted label sets) of the photos above, transformed as the pretrained model was
    evaluated on ImageNet; None when scikit-image is not installed."""
    if importlib.util.find_spec("skimage") is None:
        return None
    transform = _eval_transform(data_config)
    images = [transform(_rgb(_photo_arrays(name)[0])) for name in IMAGENET_PHOTOS]
    return torch.stack(images), list(IMAGENET_PHOTOS.values())


@functools.lru_cache(maxsize=2)  # every run of a sweep reads the same images at the same size
def _natural_batch(settings: tuple) -> torch.Tensor:
    import skimage.data

    transform = _eval_transform(dict(settings))
    arrays = [a for name in NATURAL_PHOTOS for a in _photo_arrays(name)] + list(skimage.data.lfw_subset())
    return torch.stack([transform(_rgb(a)) for a in arrays])


def natural_images(data_config: dict, count: int | None = None) -> torch.Tensor | None:
    """Every natural image scikit-image ships (220: the photos above, both views of the stereo pair,
    and ``lfw_subset``'s 100 faces and 100 non-faces, 25 px), transformed as the pretrained model
    was evaluated on ImageNet; None without scikit-image. No labels: the pretrained model's own
    predictions are the reference. ``count``: only the first so many (debug=smoke)."""
    if importlib.util.find_spec("skimage") is None:
        return None
    batch = _natural_batch(tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                                 for k, v in data_config.items() if k in EVAL_KEYS))
    return batch if count is None else batch[:count]


@torch.no_grad()
def _imagenet_log_probs(model: nn.Module, head_names, original_head: nn.Module, images, chunk: int = 64):
    device = next(model.parameters()).device
    head = original_head.to(device)
    # NHWC: x1.6 faster on CPU for 440 forward passes at 224 px (values are the same)
    chunks = [images[i:i + chunk].to(device).contiguous(memory_format=torch.channels_last)
              for i in range(0, len(images), chunk)]
    parts = [head(features(model, head_names, x)) for x in chunks]
    return torch.log_softmax(torch.cat(parts).double(), dim=1)


def imagenet_agreement(pretrained: nn.Module, finetuned: nn.Module, head_names, original_head: nn.Module,
                       images: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(pretrained || fine-tuned)) of the ImageNet predictions that the
    original head makes from each model's features: 1.0 and 0.0 for an untouched backbone."""
    before = _imagenet_log_probs(pretrained.to(memory_format=torch.channels_last), head_names, original_head, images)
    after = _imagenet_log_probs(finetuned, head_names, original_head, images)
    agreement = float((before.argmax(1) == after.argmax(1)).double().mean())
    kl = float((before.exp() * (before - after)).sum(1).mean())
    return agreement, kl


def pretrained_task_top1(model: nn.Module, head_names, original_head: nn.Module, photos) -> float:
    """Share of the photos whose top-1 ImageNet class, read by the original head from this
    model's features, is one that names the photo."""
    batch, accepted = photos
    device = next(model.parameters()).device
    logits = original_head.to(device)(features(model, head_names, batch.to(device)))
    return float(np.mean([int(i) in ok for i, ok in zip(logits.argmax(1).tolist(), accepted)]))


# (sentence, a paraphrase of it, an unrelated sentence): a sentence-embedding model should put
# the paraphrase closer. Fixed, so every run is scored on the same pairs.
SENTENCE_TRIPLES = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply today."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "He repaired the engine of his truck."),
    ("I take this pill every morning for my headache.", "Each morning I use this tablet against head pain.",
     "The football match ended in a draw."),
    ("It is raining heavily in the city.", "There is a strong downpour in town.", "She baked a chocolate cake for the party."),
    ("The doctor prescribed antibiotics for the infection.", "The physician gave her antibiotics to treat the infection.",
     "They went hiking in the mountains last weekend."),
    ("This medication made me feel dizzy and tired.", "The drug left me lightheaded and exhausted.",
     "The museum opens at nine o'clock."),
]


def sentence_similarity(model: nn.Module, head_names, tokenizer) -> tuple[float, float]:
    """(share of triples ranked right, mean cosine margin paraphrase - unrelated)."""
    device = next(model.parameters()).device
    flat = [s for triple in SENTENCE_TRIPLES for s in triple]
    batch = {k: v.to(device) for k, v in tokenizer(flat, padding=True, return_tensors="pt").items()}
    emb = torch.nn.functional.normalize(features(model, head_names, batch), dim=1).view(len(SENTENCE_TRIPLES), 3, -1)
    close = (emb[:, 0] * emb[:, 1]).sum(1)
    far = (emb[:, 0] * emb[:, 2]).sum(1)
    return float((close > far).float().mean()), float((close - far).mean())


def pretrained_task(pretrained: nn.Module, finetuned: nn.Module, head, task: str | None, original_head,
                    data_config: dict, natural_count: int | None = None) -> dict[str, float]:
    """The pretrained model's own task, before and after fine-tuning, where tunelab can score it."""
    metrics = {}
    if task == "imagenet":
        photos = imagenet_photos(data_config)
        if photos is not None:
            metrics["retention/imagenet_top1_pretrained"] = pretrained_task_top1(pretrained, head, original_head, photos)
            metrics["retention/imagenet_top1"] = pretrained_task_top1(finetuned, head, original_head, photos)
            agreement, kl = imagenet_agreement(pretrained, finetuned, head, original_head, natural_images(data_config, natural_count))
            metrics["retention/imagenet_agreement"], metrics["retention/imagenet_kl"] = agreement, kl
    elif task == "sentence_similarity":
        for label, model in (("_pretrained", pretrained), ("", finetuned)):
            ranked, margin = sentence_similarity(model, head, data_config["tokenizer"])
            metrics[f"retention/sentence_pairs{label}"] = ranked
            metrics[f"retention/sentence_margin{label}"] = margin
    return metrics


def measure(pretrained: nn.Module, finetuned: nn.Module, groups, inputs, original_head=None,
            data_config: dict | None = None, task: str | None = None, natural_count: int | None = None) -> dict[str, float]:
    """``retention/drift/<group>``, ``retention/drift/backbone``, ``retention/cka`` and, where the
    pretrained task's head and scikit-image's photos exist, ``retention/imagenet_top1`` before/after
    (four labelled photos) and ``retention/imagenet_agreement`` / ``imagenet_kl`` (220 unlabelled images)."""
    head = next(g for g in groups if g.name == "head").param_names
    device = next(finetuned.parameters()).device
    pretrained = pretrained.to(device)
    metrics = {f"retention/drift/{g.replace('+', '_')}": v for g, v in weight_drift(pretrained, finetuned, groups).items()}
    metrics["retention/cka"] = linear_cka(features(pretrained, head, inputs), features(finetuned, head, inputs))
    metrics.update(pretrained_task(pretrained, finetuned, head, task, original_head, data_config or {}, natural_count))
    return metrics
