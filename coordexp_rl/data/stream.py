"""An endless, seeded, resumable stream of training batches (a fresh permutation each epoch)."""

from __future__ import annotations

from typing import Generic, Sequence, TypeVar

import torch

T = TypeVar("T")


class BatchStream(Generic[T]):
    """``next_batch()`` walks a per-epoch permutation; ``state()`` / ``load_state()`` resume it exactly.

    >>> s = BatchStream(list("abcde"), batch_size=2, seed=0)
    >>> len(s.next_batch()), s.state()["index"]
    (2, 2)
    """

    def __init__(self, items: Sequence[T], batch_size: int, seed: int):
        if not items:
            raise ValueError("BatchStream needs at least one item")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.items), generator=g).tolist()

    def next_batch(self) -> list[T]:
        batch = []
        while len(batch) < self.batch_size:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            batch.append(self.items[self._order[self.index]])
            self.index += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._permutation()
