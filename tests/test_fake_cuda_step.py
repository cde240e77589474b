"""Fake-CUDA tier, training step: the trainer's CUDA branches (loss accumulation on the device, GradScaler,
clipping, the non-finite guard's pinned packet, the fused AdamW that reads the verdict on the device, EMA,
the stop flag's pinned copy, the loaders' device copies) run on FakeTensorMode's CUDA tensors without a GPU.

A fake tensor has no values, so any host read in the step (an .item(), a blocking copy) raises here: the
step running to its end also proves it sync-free. The autograd engine needs a real device for CUDA tensors,
so the backward is replaced by gradients of each parameter's shape (tests/test_fake_cuda.py checks the
model's backward on meta tensors)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from test_fake_cuda import fake_cuda
from test_trainer_step_sync import step_parts
from torch._subclasses.fake_tensor import unset_fake_temporarily

from gcvit.engine import build as engine_build
from gcvit.engine import distributed
from gcvit.engine.loop import Parts, train_step
from gcvit.engine.preemption import StopFlag
from gcvit_data.loaders import labels_on, normalize_on

CUDA = torch.device("cuda", 0)
# timm's EMA deep-copies the model; copying a fake tensor reads its (absent) data pointer, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")


class _Event:
    """torch.cuda.Event without a device: recording and waiting are no-ops on fake tensors, and a recorded
    interval (the step accounting's) has completed at once and lasted 0 ms."""

    def __init__(self, enable_timing: bool = False) -> None:
        pass

    def record(self, stream: object = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        return 0.0

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def fake_cuda_trainer() -> Iterator[None]:
    """fake_cuda() plus what the trainer's set-up asks of a real device: a CUDA process (distributed.init),
    the model built on the host as train.py builds it (then moved), CUDA generators and events, pinned host
    memory (fake tensors have no pages to pin: a pinned copy is a plain one)."""
    create = engine_build.create_model

    def on_host(*args, **kwargs) -> torch.nn.Module:
        with unset_fake_temporarily():
            return create(*args, **kwargs)

    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=CUDA)
    generator = torch.Generator
    with fake_cuda(), \
            mock.patch.object(distributed, "init", lambda *a, **k: env), \
            mock.patch.object(engine_build, "create_model", on_host), \
            mock.patch("torch.Generator", lambda device=None: generator()), \
            mock.patch("torch.cuda.Event", _Event), \
            mock.patch("torch.Tensor.pin_memory", lambda self: self):
        yield


def _backward_as_gradients(p: Parts) -> mock._patch:
    """loss.backward() replaced by one gradient per trainable parameter, of its shape, type and device."""
    def backward(loss: torch.Tensor, *args, **kwargs) -> None:
        assert loss.device == CUDA and loss.dtype == torch.float32 and loss.dim() == 0
        for q in p.model.parameters():
            if q.requires_grad:
                q.grad = torch.randn_like(q) if q.grad is None else q.grad + torch.randn_like(q)
    return mock.patch("torch.Tensor.backward", backward)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_runs_its_cuda_branches(precision: str) -> None:
    """Two micro-batches per step with the recipe's Mixup/CutMix, random erasing and EMA, on CUDA: the
    step returns device scalars, queues its verdict as a pinned host packet, and the optimizer's and the
    EMA's states live on the device in fp32."""
    with fake_cuda_trainer():
        cfg, env, p = step_parts("cuda", f"trainer.precision={precision}")
        assert p.accum == 2 and p.ema is not None and p.mixup is not None
        assert p.scaler.is_enabled() == (precision == "fp16")
        stop = StopFlag()
        flag = stop.tensor(env.device)
        assert (flag.device, flag.dtype, flag.dim()) == (CUDA, torch.float64, 0)
        with _backward_as_gradients(p):
            out = train_step(p, iter(p.train_loader), env, cfg, flag)
            out = train_step(p, iter(p.train_loader), env, cfg, stop.tensor(env.device))
        for key in ("loss", "grad_norm"):
            assert (out[key].device, out[key].dtype, out[key].dim()) == (CUDA, torch.float32, 0), key
        assert isinstance(out["lr"], float) and isinstance(out["wait"], float)
        packets = list(p.guard._pending)
        assert len(packets) == 2 and all(pk.ready is not None for pk in packets)
        assert all((pk.host.device.type, pk.host.dtype, tuple(pk.host.shape)) == ("cpu", torch.float64, (4,))
                   for pk in packets)
        for q in p.model.parameters():
            state = p.optimizer.state[q]
            assert {k: (v.device, v.dtype) for k, v in state.items()} == {
                k: (CUDA, torch.float32) for k in ("step", "exp_avg", "exp_avg_sq")}
        assert all(t.device == CUDA for t in p.ema.module.state_dict().values())


def test_loaders_device_copies_give_the_step_its_layout() -> None:
    """labels_on and normalize_on (every loader's last hop, DALI's runner thread included) on CUDA:
    int64 labels; normalized images channels_last in the step's input type."""
    with fake_cuda_trainer():
        labels = labels_on(torch.arange(8, dtype=torch.int32), CUDA)
        images = normalize_on(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), CUDA, torch.bfloat16)
    assert (labels.device, labels.dtype) == (CUDA, torch.int64)
    assert (images.device, images.dtype, tuple(images.shape)) == (CUDA, torch.bfloat16, (8, 3, 32, 32))
    assert images.is_contiguous(memory_format=torch.channels_last)
