"""Deterministic global sampling: which sample each rank reads, and each sample's own random generator.

Train: epoch e uses the permutation drawn from (seed, e) alone. Micro-batch k of the epoch is the global
chunk perm[k*B*W : (k+1)*B*W] (B = per-rank batch, W = world size) and rank r reads its slice
[r*B : (r+1)*B] of it, so the ranks' shards are disjoint and each global chunk is the same set of samples
for any W at the same B*W. The last N mod (B*W) samples of the permutation (at most B*W-1) are dropped:
a different tail every epoch, since the permutation changes. Progress is counted in global samples, so a
run saved with one world size resumes with another as long as the position is a multiple of the new B*W
(always true at optimizer-step boundaries when the global batch is unchanged).

Val: rank r reads samples r, r+W, r+2W, ... in order, unpadded: every image exactly once over all ranks;
ranks may yield one batch more or less than others.

Augmentation randomness comes from `sample_rng(seed, epoch, index)`, never from a stream shared between
samples, so a sample is augmented identically whichever rank, batch or restart reads it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=2)  # a pass asks for it per batch; 1.28M samples take ~30 ms to permute
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global order of epoch `epoch`: a function of (seed, epoch) only (shared: read-only)."""
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of all random augmentation choices for one sample in one epoch."""
    return np.random.default_rng([seed, epoch, index, 0xA06])


class GlobalSampler:
    """Yields this rank's micro-batches of global sample indices, from a resumable position."""

    def __init__(self, num_samples: int, *, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples, self.batch_size, self.seed, self.train = num_samples, batch_size, seed, train
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # train: global samples of this epoch already consumed by all ranks

    @property
    def global_batch(self) -> int:
        """Samples one micro-batch step consumes over all ranks."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Micro-batches this rank yields in a whole epoch."""
        if self.train:
            return self.num_samples // self.global_batch
        mine = len(range(self.rank, self.num_samples, self.world_size))
        return math.ceil(mine / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning."""
        self.epoch, self.position = epoch, 0

    def batches(self) -> Iterator[np.ndarray]:
        """This rank's remaining micro-batches of the epoch; the consumer calls advance() per batch taken.

        Readers prefetch ahead of the consumer, so only the consumer knows what was really used.
        """
        epoch, position = self.epoch, self.position
        return (self.batch(epoch, position, k) for k in range(self.remaining()))

    def remaining(self) -> int:
        """Micro-batches this rank has left in the epoch from the current position."""
        return len(self) - self.position // self.global_batch if self.train else len(self)

    def batch(self, epoch: int, position: int, k: int) -> np.ndarray:
        """This rank's k-th micro-batch of a pass that starts at `position` of `epoch` (k < remaining()).

        A function of its arguments and the sampler's configuration only, never of the sampler's own
        epoch or position: worker processes holding a copy compute the very batches batches() yields.
        """
        if not self.train:
            start = (k * self.batch_size) * self.world_size + self.rank
            return np.arange(start, min(start + self.batch_size * self.world_size, self.num_samples),
                             self.world_size)
        lo = position + k * self.global_batch + self.rank * self.batch_size
        return epoch_permutation(self.num_samples, self.seed, epoch)[lo:lo + self.batch_size].copy()

    def advance(self) -> None:
        """Record that the consumer took one more micro-batch on every rank."""
        if self.train:
            self.position += self.global_batch

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed position: loadable with torch.load(weights_only=True)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the exact next sample of a saved position (any world size with B*W dividing it)."""
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(f"loader state is for {state['num_samples']} samples with seed {state['seed']}, "
                             f"this loader has {self.num_samples} with seed {self.seed}; it belongs to "
                             "another dataset or seed")
        if state["position"] % self.global_batch:
            raise ValueError(f"loader position {state['position']} is not a multiple of the global "
                             f"micro-batch {self.global_batch} (batch {self.batch_size} x {self.world_size} "
                             "ranks); resume with a world size and batch that divide it (same global batch)")
        self.epoch, self.position = state["epoch"], state["position"]
