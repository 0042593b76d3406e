"""Image data: items read by PIL and transformed by timm, normalised as the pretrained model expects."""

from __future__ import annotations

from typing import Annotated, Callable

import numpy as np
from omegaconf import OmegaConf
from timm.data import create_transform
from torch.utils.data import Dataset

from tunelab.config.settings import check_call, checked, integer, mapping, reads
from tunelab.data.datamodule import TaskDataModule
from tunelab.data.multilabel import label_at
from tunelab.data.preprocess import image_eval_transform, load_image
from tunelab.data.sampling import sample_seed, seeded_call
from tunelab.data.shifts import image_shift
from tunelab.data.table import Table
from tunelab.errors import TunelabError


class _Images(Dataset):
    """Items by position; a training sampler passes ``(epoch, position)`` so that random
    augmentation is a pure function of (seed, epoch, image), see data/sampling.py."""

    def __init__(self, table: Table, indices: np.ndarray, transform: Callable, seed: int = 0, seeded: bool = False):
        self.table, self.indices, self.transform, self.seed = table, indices, transform, seed
        self.seeded = seeded  # random evaluation transforms (OOD noise) drawn per image, the same every time

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        j = int(self.indices[i])
        image, label = load_image(self.table.items[j]), label_at(self.table.labels, j)
        if epoch is None and self.seeded:
            return seeded_call(sample_seed(self.seed, -1, j), self.transform, image), label
        if epoch is None:
            return self.transform(image), label
        return seeded_call(sample_seed(self.seed, epoch, j), self.transform, image), label


# create_transform arguments the module sets itself from the model's data config
AUGMENT_FILLED = ("is_training", "input_size", "mean", "std", "interpolation")
reads("data.augment", filled=AUGMENT_FILLED, func=create_transform)  # a dict splatted into timm's call


class ImageDataModule(TaskDataModule):
    """Images through timm transforms, normalised as the pretrained model expects."""

    modality = "image"

    @checked("data")
    def __init__(self, source: Callable[[], Table], name: str = "images",
                 image_size: Annotated[int | None, integer(8, 4096, null=True)] = None,
                 augment: Annotated[dict | None, mapping()] = None, ood: dict | None = None, **kwargs):
        super().__init__(source, name=name, **kwargs)
        self.image_size = image_size
        # checked now, not at the first training batch (after the run exists)
        check_call(create_transform, augment, "data.augment", filled=AUGMENT_FILLED)
        self.augment = OmegaConf.to_container(augment, resolve=True) if OmegaConf.is_config(augment) else augment or None
        self.ood = {str(k): dict(v) for k, v in (ood or {}).items()}

    @property
    def model_kwargs(self) -> dict:
        return {"image_size": self.image_size}

    def random_training_inputs(self) -> str | None:
        return "random augmentation (data.augment; data.augment=null turns it off)" if self.augment else None

    def eval_settings(self) -> dict:
        """Size, normalisation and interpolation of evaluation images: what exports and served
        models save so they preprocess exactly like the test split."""
        cfg = self.model_data_config
        return {"size": int(self.image_size or cfg.get("input_size", (3, 224, 224))[-1]),
                "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))), "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
                "interpolation": cfg.get("interpolation", "bilinear")}

    def _transform(self, training: bool):
        s = self.eval_settings()
        if training and self.augment is not None:
            return create_transform(is_training=True, input_size=(3, s["size"], s["size"]), mean=tuple(s["mean"]),
                                    std=tuple(s["std"]), interpolation=s["interpolation"], **self.augment)
        # crop_pct=1 (inside): small task images are already framed; cropping would cut digits off.
        return image_eval_transform(**s)

    def dataset(self, split: str, training: bool = False) -> Dataset:
        self.scan()
        table, idx = self.splits[split]
        return _Images(table, idx, self._transform(training), self.seed)

    def resized_dataset(self, split: str, size: int) -> Dataset:
        """A split's evaluation images resized to ``size`` px instead of the model's: test-time
        crops (deploy/tta.py) are cut from a larger resize, normalised like the test split."""
        self.scan()
        table, idx = self.splits[split]
        return _Images(table, idx, image_eval_transform(**{**self.eval_settings(), "size": size}), self.seed)

    def ood_dataset(self, name: str) -> Dataset:
        """The test split shifted as ``ood.<name>`` says, or another source with the same classes."""
        from torchvision.transforms import Compose

        self.scan()
        spec = dict(self.ood[name])
        if "source" in spec:
            table = spec["source"]() if callable(spec["source"]) else spec["source"]
            if list(table.classes) != list(self.table.classes):
                raise TunelabError(f"data.ood.{name}: its classes {table.classes[:8]} differ from the task's "
                                   f"{self.table.classes[:8]}; an OOD split must use the same classes.")
            return _Images(table, np.arange(len(table)), self._transform(False), self.seed)
        table, idx = self.splits["test"]
        return _Images(table, idx, Compose([image_shift(name, spec), self._transform(False)]), self.seed, seeded=True)
