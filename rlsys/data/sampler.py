"""Seeded, resumable batches of training prompts.

Choices
    * Epoch ``e`` visits every prompt once, in an order that depends only on ``(seed, e)`` and the
      number of prompts: indices are sorted by a BLAKE2b hash of ``"seed:epoch:index"``. That is
      independent of global RNG state and of Python, NumPy and torch versions, so a resumed run
      replays exactly the order it would have had. Costs about 2.5 s per million prompts.
    * Batches wrap across epochs, never drop: when fewer than ``batch_size`` prompts remain in an
      epoch, the batch takes them and is completed from the start of the next epoch's order. Every
      batch is full and every prompt is seen exactly once per epoch. When a batch is larger than
      the dataset, it spans several epochs and repeats prompts.
    * The position is ``{"epoch", "offset"}``: the next prompt is ``order(epoch)[offset]``, with
      ``0 <= offset < num_prompts`` after every batch. The order is derived from the dataset size,
      so resuming on a different dataset (other files, another ``max_prompt_length``) gives a
      different order; keep the data fixed across a resume.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlsys.config import DataConfig
    from rlsys.data.dataset import Prompt, PromptDataset


def epoch_order(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(num_prompts)`` that depends only on the arguments."""
    prefix = f"{seed}:{epoch}:".encode()
    return sorted(
        range(num_prompts),
        key=lambda index: hashlib.blake2b(prefix + str(index).encode(), digest_size=8).digest(),
    )


class EpochBatchSampler:
    """Indices of training prompts, ``batch_size`` at a time, epoch after epoch."""

    def __init__(self, num_prompts: int, batch_size: int, *, shuffle: bool = True, seed: int = 1) -> None:
        if num_prompts <= 0:
            raise ValueError(f"num_prompts must be positive, got {num_prompts}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._cached_epoch: int | None = None
        self._cached_order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        """The visiting order of ``epoch``: seeded when shuffling, file order otherwise."""
        if self._cached_epoch != epoch:
            if self.shuffle:
                self._cached_order = epoch_order(self.num_prompts, self.seed, epoch)
            else:
                self._cached_order = list(range(self.num_prompts))
            self._cached_epoch = epoch
        return self._cached_order

    def next_indices(self) -> list[int]:
        """The next batch of indices; advances the position."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.num_prompts - self.offset)
            batch.extend(self.order(self.epoch)[self.offset : self.offset + take])
            self.offset += take
            if self.offset == self.num_prompts:
                self.epoch += 1
                self.offset = 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.num_prompts:
            raise ValueError(f"sampler state {state} does not fit a dataset of {self.num_prompts} prompts")
        self.epoch, self.offset = epoch, offset


class PromptBatches:
    """Training batches of ``Prompt`` objects: a dataset read through an ``EpochBatchSampler``."""

    def __init__(self, dataset: PromptDataset, batch_size: int, *, shuffle: bool = True, seed: int = 1) -> None:
        self.dataset = dataset
        self.sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed)

    @classmethod
    def from_config(cls, dataset: PromptDataset, batch_size: int, config: DataConfig) -> PromptBatches:
        return cls(dataset, batch_size, shuffle=config.shuffle, seed=config.seed)

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self.sampler.epoch

    def next_batch(self) -> list[Prompt]:
        return [self.dataset[index] for index in self.sampler.next_indices()]

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
