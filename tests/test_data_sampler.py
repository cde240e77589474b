"""The global sampler: exactly-once sharding, order independent of world size, resumable positions."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from gcvit_data.sampler import GlobalSampler, epoch_permutation


def _epoch(n: int, batch: int, world: int, *, train: bool, epoch: int = 0,
           seed: int = 0) -> list[list[list[int]]]:
    """Each rank's micro-batches of one epoch."""
    out = []
    for rank in range(world):
        s = GlobalSampler(n, batch_size=batch, rank=rank, world_size=world, seed=seed, train=train)
        s.set_epoch(epoch)
        out.append([b.tolist() for b in s.batches()])
        assert len(out[-1]) == len(s)
    return out


@pytest.mark.parametrize("n,batch,world",
                         [(1, 1, 1), (7, 2, 3), (100, 8, 2), (101, 4, 4), (5, 8, 2), (64, 8, 8)])
def test_val_every_image_exactly_once_without_padding(n: int, batch: int, world: int) -> None:
    ranks = _epoch(n, batch, world, train=False)
    ids = [i for r in ranks for b in r for i in b]
    assert sorted(ids) == list(range(n))  # no duplicate, none missing, for any size and world
    assert all(0 < len(b) <= batch for r in ranks for b in r)


@pytest.mark.parametrize("n,batch,world", [(100, 8, 2), (101, 4, 4), (64, 8, 1), (30, 3, 3)])
def test_train_disjoint_shards_exactly_once_with_documented_tail(n: int, batch: int, world: int) -> None:
    ranks = _epoch(n, batch, world, train=True, epoch=3)
    ids = [i for r in ranks for b in r for i in b]
    assert len(ids) == len(set(ids))
    assert len(ids) == n - n % (batch * world)  # the dropped tail is < one global micro-batch
    assert all(len(b) == batch for r in ranks for b in r)
    perm = epoch_permutation(n, 0, 3)
    assert set(ids) == set(perm[:len(ids)].tolist())  # the tail dropped is the permutation's last samples


def test_global_order_depends_on_seed_and_epoch_only() -> None:
    """At the same global micro-batch B*W, step k consumes the same samples for any world size."""
    one = _epoch(96, 8, 1, train=True, epoch=2)[0]
    for world in (2, 4, 8):
        ranks = _epoch(96, 8 // world, world, train=True, epoch=2)
        steps = [sorted(itertools.chain.from_iterable(r[k] for r in ranks)) for k in range(len(ranks[0]))]
        assert steps == [sorted(b) for b in one]
    assert _epoch(96, 8, 1, train=True, epoch=3)[0] != one
    assert _epoch(96, 8, 1, train=True, epoch=2, seed=1)[0] != one


def test_resume_continues_at_next_sample_with_another_world_size() -> None:
    ref = _epoch(96, 4, 2, train=True, epoch=1)  # 2 ranks x 4
    s = GlobalSampler(96, batch_size=4, rank=0, world_size=2, seed=0, train=True)
    s.set_epoch(1)
    for _ in itertools.islice(s.batches(), 5):
        s.advance()  # the consumer took 5 micro-batches on every rank
    state = s.state_dict()
    assert state == {"epoch": 1, "position": 40, "seed": 0, "num_samples": 96}
    assert all(isinstance(v, int) for v in state.values())  # plain types: weights_only checkpoints
    rest = set()
    for rank in range(4):  # resumed on 4 ranks x 2: the same global micro-batch of 8
        r = GlobalSampler(96, batch_size=2, rank=rank, world_size=4, seed=0, train=True)
        r.set_epoch(0)
        r.load_state_dict(state)
        rest |= {i for b in r.batches() for i in b.tolist()}
    before = {i for rk in ref for b in rk[:5] for i in b}
    after = {i for rk in ref for b in rk[5:] for i in b}
    assert rest == after and not rest & before


def test_resume_refuses_a_position_the_new_shape_cannot_reach() -> None:
    s = GlobalSampler(96, batch_size=3, rank=0, world_size=2, seed=0, train=True)
    with pytest.raises(ValueError, match="not a multiple of the global micro-batch 6"):
        s.load_state_dict({"epoch": 0, "position": 8, "seed": 0, "num_samples": 96})
    with pytest.raises(ValueError, match="another dataset or seed"):
        s.load_state_dict({"epoch": 0, "position": 6, "seed": 0, "num_samples": 95})


def test_permutation_is_a_permutation() -> None:
    p = epoch_permutation(1000, 5, 7)
    assert np.array_equal(np.sort(p), np.arange(1000))
    assert np.array_equal(p, epoch_permutation(1000, 5, 7))
