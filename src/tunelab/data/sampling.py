"""Training order and augmentation as pure functions of (seed, epoch, index).

That makes a run resumed mid-epoch see exactly the batches, in the same order and with the
same random augmentation, that the uninterrupted run saw, whatever the number of workers:
the sampler skips what the interrupted run already trained on, and every sample's
augmentation draws from its own seeded generator instead of the global one.
"""

from __future__ import annotations

import random
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import Sampler, WeightedRandomSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**63)


class EpochSampler(Sampler):
    """Yields ``(pass, index)``: a permutation seeded by (seed, pass), optionally skipping a prefix.

    ``min_samples`` repeats a small training set, reshuffled each time, until an epoch holds at
    least that many samples: 10 labelled images otherwise make a one-step epoch, and every
    epoch-based setting (a strategy's head epochs, validation, checkpoints) would follow suit.
    Each repeat is its own pass, so a repeated image draws a new augmentation.

    ``weights`` (one per sample) draws each pass with replacement in those proportions instead
    (torch's WeightedRandomSampler, seeded the same way): ``data.sampler=balanced`` gives each
    sample 1 / its class's count, so every class is drawn equally often on average.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, min_samples: int | None = None,
                 weights: torch.Tensor | None = None):
        self.size, self.seed, self.shuffle, self.weights = size, seed, shuffle, weights
        self.passes = max(1, -(-(min_samples or 0) // max(size, 1)))  # ceil division
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size * self.passes

    def __iter__(self) -> Iterator[tuple[int, int]]:
        keys = []
        for repeat in range(self.passes):
            seen = self.epoch * self.passes + repeat  # == epoch without repeats
            if self.weights is not None:
                order = list(WeightedRandomSampler(self.weights, self.size, replacement=True,
                                                   generator=torch.Generator().manual_seed(self.seed + seen)))
            elif self.shuffle:
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + seen)).tolist()
            else:
                order = list(range(self.size))
            keys += [(seen, i) for i in order]
        start = self.skip() if callable(self.skip) else self.skip
        self.skip = 0  # a skip applies to one iteration (the resumed epoch) only
        return iter(keys[start:])


def seeded_call(seed: int, fn, *args):
    """Run ``fn`` with torch's CPU generator and ``random`` seeded by ``seed``, leaving the global
    streams as they were. Only the CPU generator: ``torch.manual_seed`` would also reseed every
    accelerator's stream (the GPU's dropout draws, which fork_rng(devices=[]) does not restore)
    and, before CUDA starts (in loader workers), record a stack trace per call: ~2 ms per image."""
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return fn(*args)
    finally:
        random.setstate(state)


class MidEpochResume(L.Callback):
    """On a run resumed from a mid-epoch checkpoint, skip the batches it already trained on,
    and put the global RNG (dropout, drop-path) back where the checkpoint left it."""

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # (Lightning calls no on_train_epoch_start for an epoch it resumes in the middle.)
        loop = trainer.fit_loop.epoch_loop
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not loop.restarting or not isinstance(sampler, EpochSampler):
            return

        def done_samples() -> int:
            # Read when the epoch's iterator is created: Lightning finishes restoring the
            # loop's batch counters only after this hook.
            done = loop.batch_progress.current.completed
            return done * loader.batch_size if 0 < done < trainer.num_training_batches else 0

        sampler.skip = done_samples

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        version, internal, gauss = random.getstate()
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": list(internal),
                             "python_version": version, "python_gauss": gauss}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
