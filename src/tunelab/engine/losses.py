"""The ``loss`` group's vocabulary: what ``conf/loss/*.yaml`` builds (docs/fine-tuning.md#losses).

A loss is called as ``loss(outputs, targets)`` and returns the mean over the batch:
- classification: logits (N, C) and class indices (N,), or class probabilities (N, C) when
  mixup/cutmix mixed the batch (``soft_targets`` says whether a loss takes those);
- multi-label: logits (N, L) and 0/1 targets (N, L);
- regression: predictions and targets on the standardised scale the head learns.

Each loss names the tasks it fits (``tasks``); ``check_loss`` refuses the others in one line
before any run exists. Class weights given as ``balanced`` come from the training split's
counts (``class_counts``, passed in by the build like ``num_outputs``), as scikit-learn's
``class_weight="balanced"`` computes them: ``n_samples / (n_classes × count)``.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from omegaconf import ListConfig, OmegaConf
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from tunelab.config.root import conf_dir
from tunelab.config.settings import FRACTION, Rule, checked, number
from tunelab.errors import TunelabError


def _is_weights(v: Any) -> bool:
    if v is None or v == "balanced":
        return True
    return isinstance(v, (list, tuple, ListConfig)) and len(v) > 0 and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in v)


WEIGHTS = Rule(_is_weights, "null, balanced or a list of one non-negative number per class")


def balanced_weights(class_counts: list[int]) -> torch.Tensor:
    """scikit-learn's "balanced" weights; a class absent from training gets weight 0 (it has no
    samples to weigh) rather than an infinite one."""
    counts = torch.tensor([float(c) for c in class_counts])
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights


def class_weights(weights, class_counts: list[int] | None, num_outputs: int | None) -> torch.Tensor | None:
    """The weight per class a loss uses: none, the given list (one per class), or balanced."""
    if weights is None:
        return None
    if weights == "balanced":
        if not class_counts:
            raise TunelabError("loss.weights=balanced needs the training split's class counts; "
                               "give one weight per class instead.")
        return balanced_weights(class_counts)
    if num_outputs is not None and len(weights) != num_outputs:
        raise TunelabError(f"loss.weights has {len(weights)} values but the data has {num_outputs} classes; "
                           "give one weight per class (in the order of the classes) or use balanced.")
    return torch.tensor([float(w) for w in weights])


def _listed(weights: torch.Tensor) -> str:
    return "[" + ", ".join(f"{w:.3g}" for w in weights.tolist()) + "]"


class TaskLoss(nn.Module):
    """A loss with the tasks it fits, and per-class weights as a buffer (they follow the device)."""

    tasks: tuple[str, ...] = ()
    soft_targets = False  # takes class probabilities (mixup/cutmix) as well as indices

    def __init__(self, weights=None, class_counts: list[int] | None = None, num_outputs: int | None = None):
        super().__init__()
        self.register_buffer("weight", class_weights(weights, class_counts, num_outputs), persistent=False)
        self.weights_from = "balanced (from the training split's class counts)" if weights == "balanced" else "given"

    def describe(self) -> str:
        """One line for the plan printed at the start of a run (and its stage_table.txt)."""
        line = f"loss: {type(self).__name__}"
        if self.weight is not None:
            line += f", class weights {self.weights_from}: {_listed(self.weight)}"
        return line


class CrossEntropy(TaskLoss):
    """Cross-entropy with optional label smoothing and class weights (torch's ``cross_entropy``)."""

    tasks = ("classification",)
    soft_targets = True

    @checked("loss")
    def __init__(self, label_smoothing: Annotated[float, FRACTION] = 0.0, weights: Annotated[Any, WEIGHTS] = None,
                 class_counts: list[int] | None = None, num_outputs: int | None = None):
        super().__init__(weights, class_counts, num_outputs)
        self.label_smoothing = label_smoothing

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, weight=self.weight, label_smoothing=self.label_smoothing)


class FocalLoss(TaskLoss):
    """Focal loss (Lin et al. 2017): ``-(1 - p_t)^gamma · log p_t``, weighted per class, which
    down-weights the examples the model already gets right. Over the softmax for single-label
    classification; torchvision's ``sigmoid_focal_loss`` per label for multi-label (where
    ``alpha`` weighs positives against negatives)."""

    tasks = ("classification", "multilabel")

    @checked("loss")
    def __init__(self, gamma: Annotated[float, number(0)] = 2.0, weights: Annotated[Any, WEIGHTS] = None,
                 alpha: Annotated[float | None, number(0, 1, null=True)] = None,
                 class_counts: list[int] | None = None, num_outputs: int | None = None, task: str = "classification"):
        super().__init__(weights if task == "classification" else None, class_counts, num_outputs)
        if task != "classification" and weights is not None:
            raise TunelabError("loss.weights is for single-label classification; for multi-label data weigh "
                               "positives with loss.alpha.")
        self.gamma, self.alpha, self.multilabel = gamma, alpha, task == "multilabel"

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return sigmoid_focal_loss(out, y.float(), alpha=-1 if self.alpha is None else self.alpha,
                                      gamma=self.gamma, reduction="mean")
        log_p = F.log_softmax(out, dim=-1).gather(1, y.unsqueeze(1)).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:  # normalised like cross_entropy's weighted mean
            w = self.weight[y]
            return (w * loss).sum() / w.sum()
        return loss.mean()


class BinaryCrossEntropy(TaskLoss):
    """Multi-label: an independent sigmoid per label (torch's ``binary_cross_entropy_with_logits``).
    ``pos_weight: balanced`` weighs each label's positives by negatives / positives in training."""

    tasks = ("multilabel",)

    @checked("loss")
    def __init__(self, pos_weight: Annotated[Any, WEIGHTS] = None, class_counts: list[int] | None = None,
                 num_outputs: int | None = None, num_samples: int | None = None):
        super().__init__(None, class_counts, num_outputs)
        weight = None
        if pos_weight == "balanced":
            if not class_counts or not num_samples:
                raise TunelabError("loss.pos_weight=balanced needs the training split's label counts.")
            positives = torch.tensor([float(c) for c in class_counts]).clamp(min=1)
            weight = (num_samples - positives).clamp(min=0) / positives
        elif pos_weight is not None:
            weight = class_weights(pos_weight, None, num_outputs)
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), pos_weight=self.pos_weight)

    def describe(self) -> str:
        if self.pos_weight is None:
            return "loss: BinaryCrossEntropy"
        return f"loss: BinaryCrossEntropy, positive weights {_listed(self.pos_weight)}"


class MeanSquaredError(TaskLoss):
    tasks = ("regression",)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y)


class Huber(TaskLoss):
    """Huber loss: quadratic within ``delta`` (in standard deviations of the targets), linear
    beyond, so a few wild targets pull less than under MSE. ``delta: 1`` is smooth-L1."""

    tasks = ("regression",)

    @checked("loss")
    def __init__(self, delta: Annotated[float, number(0, low_open=True)] = 1.0):
        super().__init__()
        self.delta = delta

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(out, y, delta=self.delta)


DEFAULT = {"classification": CrossEntropy, "multilabel": BinaryCrossEntropy, "regression": MeanSquaredError}


def task_default(task: str) -> TaskLoss:
    """``loss=auto`` (the default), and the loss of a stored run from before the loss group."""
    return DEFAULT[task]()


def shipped_choices(task: str) -> list[str]:
    """The ``conf/loss/`` choices that fit ``task``, read from the folder."""
    fitting = []
    for path in sorted((conf_dir() / "loss").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_", "")
        if target.startswith(f"{__name__}.") and task in getattr(globals().get(target.rsplit(".", 1)[1]), "tasks", ()):
            fitting.append(path.stem)
    return fitting


def check_loss(loss, task: str) -> None:
    """A loss that does not fit the data's task is refused before any run exists."""
    tasks = getattr(loss, "tasks", None)
    if tasks and task not in tasks:
        raise TunelabError(f"the loss {type(loss).__name__} is for {' or '.join(tasks)} data but data.task={task}; "
                           f"choose one of loss={', loss='.join(shipped_choices(task))}.")


task_default.tasks = tuple(DEFAULT)  # fits every task
