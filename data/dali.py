"""DALI train/val pipelines (one definition for cpu and gpu decode) and the loader that feeds them.

Python reads each file's header and draws the sample's crop, flip and RandAugment choices from the sample's
own generator (sampler.sample_rng); DALI gets them, and the path it reads the file from (from a pack or
WebDataset shards: the encoded bytes, read from the shard with one pread), as inputs of an external_source
(the feeder, data/feeder.py) that runs in DALI's worker processes, so the training thread only hands a few
arrays per batch over. So an image's augmentation depends on (seed, epoch, index) only: not on the rank,
the batch, a restart or which process computed it.
"""
from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing.util
import queue
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray
from nvidia.dali.tensors import TensorListGPU
from PIL import Image

from gcvit_data import dali_augment
from gcvit_data.augment import RandAugmentSpec
from gcvit_data.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig, DataConfig, checked_interpolation
from gcvit_data.dali_resize import TorchResize, resize_center_crop, to_square
from gcvit_data.feeder import INPUTS, TRAIN_PARAMS, Feeder, PassPlan
from gcvit_data.index import BadImage, DataError, Index, bad_image
from gcvit_data.loader_base import Batch, Loader, labels_on
from gcvit_data.sampler import GlobalSampler


def _inputs(source: Any, ahead: int, from_bytes: bool) -> list[Any]:
    """The encoded files (read by DALI's threads from the feeder's paths; from shards, the feeder's own
    output) and the feeder's other outputs for one batch; ahead > 0: the feeder runs in DALI's worker
    processes, that many batches ahead of the pipeline (one batch is one worker's task, so `ahead` workers
    run at once)."""
    parallel = {"parallel": True, "prefetch_queue_depth": ahead} if ahead else {}
    paths, *rest = fn.external_source(source=source, num_outputs=len(INPUTS), batch=True, batch_info=True,
                                      **parallel)
    return [paths if from_bytes else fn.io.file.read(paths), *rest]


def _hardware(decoder: str, load: float) -> dict[str, float]:
    """The gpu (mixed) decoders' share of JPEGs for the GPU's hardware JPEG engine (A100, H100, H200; others
    have none and ignore it); the rest go to nvJPEG's CUDA decoder. The cpu decoders take no such argument."""
    return {"hw_decoder_load": load} if decoder == "mixed" else {}


def _normalize(images: Any, half: bool, mirror: Any = 0) -> Any:
    """Flip, ImageNet mean/std, uint8 -> float16/32 (one fused DALI op), kept HWC: each batch is the NHWC
    memory of the channels_last NCHW tensor the model runs on, so no layout or dtype copy follows."""
    mean, std = [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT16 if half else types.FLOAT,
                                    output_layout="HWC", mean=mean, std=std)


@pipeline_def(enable_conditionals=True)
def train_pipeline(source: Any, decoder: str, img_size: int, interp: str, spec: RandAugmentSpec | None,
                   torch_resize: TorchResize | None, half: bool, ahead: int = 0, from_bytes: bool = False,
                   hw_decoder_load: float = 0.65):
    """ROI decode of the drawn crop, resize, RandAugment, flip + normalize; ids and labels pass through."""
    encoded, params, keys = _inputs(source, ahead, from_bytes)
    images = fn.decoders.image_slice(encoded, params[0:2], params[2:4], device=decoder, output_type=types.RGB,
                                     axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                     adjust_orientation=False, jpeg_fancy_upsampling=True,
                                     **_hardware(decoder, hw_decoder_load))
    images = to_square(images, img_size, interp, torch_resize)
    if spec is not None:
        n, first = spec.num_layers, len(TRAIN_PARAMS)
        ops, bins, signs = (params[first + k * n:first + (k + 1) * n] for k in range(3))
        images = dali_augment.rand_augment(images, ops, bins, signs, spec, img_size)
    return _normalize(images, half, params[4]), keys[1:2], keys[0:1]


@pipeline_def
def val_pipeline(source: Any, decoder: str, img_size: int, interp: str, torch_resize: TorchResize | None,
                 half: bool, ahead: int = 0, from_bytes: bool = False, hw_decoder_load: float = 0.65):
    """Decode, timm's resize-shorter-side + center-crop, normalize."""
    encoded, geometry, keys = _inputs(source, ahead, from_bytes)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False,
                               jpeg_fancy_upsampling=True, **_hardware(decoder, hw_decoder_load))
    images = resize_center_crop(images, geometry, img_size, interp, torch_resize)
    return _normalize(images, half), keys[1:2], keys[0:1]


def _serve(jobs: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
    """The runner thread: each job's (result, None) or (None, what it raised), until a None job."""
    while (job := jobs.get()) is not None:
        try:
            results.put((job(), None))
        except BaseException as e:  # noqa: BLE001 - StopIteration included: the caller re-raises it
            # the traceback keeps its lines but not the frames' locals: they hold the loader, which holds
            # this queue, a cycle that only the garbage collector would free (see Runner.result)
            traceback.clear_frames(e.__traceback__)
            results.put((None, e))
        del job  # a bound method of the loader: holding it would keep the loader alive


class Runner:
    """A daemon thread that runs one job at a time for the training thread, which collects its result later.

    The loader runs pipe.run() here, one batch ahead: DALI's Python per batch (receiving the feeder's
    batch from a worker, scheduling the next, feeding the external source, scheduling the graph, wrapping
    the outputs) then overlaps the training step instead of running on the thread that launches its
    kernels; it holds the GIL only for that Python, and DALI's waits release it. A daemon thread, so a
    pipeline that never answers cannot keep the process from exiting.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = False  # a job started and not collected
        self.thread = threading.Thread(target=_serve, args=(self._jobs, self._results), daemon=True,
                                       name="gcvit-dali-run")
        self.thread.start()
        weakref.finalize(self, self._jobs.put, None)  # the thread ends with its runner

    def start(self, job: Callable[[], Any]) -> None:
        """Run `job` on the thread (the previous one must have been collected)."""
        self.pending = True
        self._jobs.put(job)

    def result(self) -> Any:
        """Wait for the started job; its return value, or what it raised."""
        self.pending = False
        out, error = self._results.get()
        if error is None:
            return out
        # Raised without a local holding it: a loader only the garbage collector frees can be freed in a
        # forked process (a DataLoader worker), where destroying its DALI pipeline waits forever.
        try:
            raise error
        finally:
            del error


class DaliLoader(Loader):
    """Loader over one long-lived DALI pipeline; a pass abandoned early is drained before the next.

    Each pass (the rest of an epoch from the sampler's position) is one DALI epoch: the loader plans it
    (feeder.PassPlan) before running the pipeline, and the feeder, wherever it runs, reads the plan.
    """

    def __init__(self, index: Index, data: DataConfig, aug: AugConfig | None, sampler: GlobalSampler, *,
                 img_size: int, seed: int, device: torch.device, dtype: torch.dtype, split: str,
                 audit_dir: str | None) -> None:
        super().__init__(sampler, len(index.classes), split, audit_dir)
        if data.dali_device == "gpu" and device.type != "cuda":
            raise DataError(f"data.dali_device=gpu needs a CUDA training device, got {device}; "
                            "use data.dali_device=cpu")
        if data.feeder_workers < 0:
            raise DataError(f"data.feeder_workers={data.feeder_workers} must be >= 0 (0 feeds DALI from the "
                            "training thread)")
        self.index, self.data, self.aug, self.img_size, self.seed = index, data, aug, img_size, seed
        self.device, self.dtype = device, dtype
        self.plan = PassPlan()
        # multiprocessing's finalizers run when the loader goes and at exit, also in a process started by
        # torch.multiprocessing (which ends with os._exit, skipping atexit), never in a forked child
        multiprocessing.util.Finalize(self, self.plan.remove, exitpriority=0)
        self.feeder = Feeder(index, sampler, aug, img_size, data.crop_pct, seed, self.plan)
        self._pipe: Any = None
        self._interp = checked_interpolation(data.interpolation)
        # the cpu pipelines resize on torch's kernels (data/dali_resize.py); the gpu ones use DALI's
        self._torch_resize = None if data.dali_device == "gpu" else TorchResize(self._interp, data.workers)
        self._pass: int | None = None  # the DALI epoch of a pass started and not run to its end
        self._taken = 0  # batches the current pass has yielded
        self.runner = Runner()  # runs self._next: pipe.run() one batch ahead of the training thread

    def _pipeline(self) -> Any:
        gpu, workers = self.data.dali_device == "gpu", self.data.feeder_workers
        # all workers busy, and never fewer batches ahead than the pipeline's own queue
        ahead = max(workers, self.data.prefetch) if workers else 0
        kw = dict(batch_size=self.data.batch_size, num_threads=max(1, self.data.workers),
                  device_id=(self.device.index or 0) if gpu else None, seed=self.seed, exec_dynamic=True,
                  prefetch_queue_depth=self.data.prefetch, py_num_workers=max(1, workers),
                  py_start_method="spawn", source=self.feeder, ahead=ahead, img_size=self.img_size,
                  decoder="mixed" if gpu else "cpu", interp=self._interp, torch_resize=self._torch_resize,
                  half=self.dtype == torch.float16, from_bytes=self.feeder.from_bytes,
                  hw_decoder_load=self.data.hw_decoder_load)
        self.plan.clear()  # a new pipeline counts its epochs from 0
        pipe = val_pipeline(**kw) if self.aug is None else train_pipeline(spec=self.feeder.spec, **kw)
        pipe.build()
        pool = getattr(pipe, "_py_pool", None)  # DALI closes it only at garbage collection or atexit
        if pool is not None:  # so a multiprocessing child's exit, which joins its children, can end
            multiprocessing.util.Finalize(pipe, pool.close, exitpriority=0)
        return pipe

    def _end_pass(self) -> None:
        """After DALI reported the end of its epoch: ready for the next one."""
        self._pipe.reset()
        self._pass = None

    def _drain(self) -> None:
        """Discard what the pipeline, its workers and the runner prefetched for an abandoned pass."""
        self.plan.end(self._pass)
        with contextlib.suppress(StopIteration):
            if self.runner.pending:
                self.runner.result()
            while True:
                self._pipe.run()
        self._end_pass()

    def _next(self, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the runner thread: the pipeline's next batch in the form the step consumes, on the training
        device, the copies queued on the training thread's `stream` (None on a cpu device).

        CPU outputs are shared, not copied (a 64-image float batch is 38 MB: copying it cost ~100 us per
        image on the feeding thread). That is safe because the dynamic executor (exec_dynamic=True, set
        above) gives every iteration its own reference-counted buffers: a batch the caller still holds is
        never overwritten by a later one (tests/test_data_loaders.py holds whole epochs to check it).
        """
        images, labels, ids = self._pipe.run()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            images = self._to_device(images).permute(0, 3, 1, 2)  # NHWC memory: channels_last NCHW
            # labels and ids are always cpu outputs: labels_on copies the labels out of DALI's buffer safely
            labels = labels_on(torch.from_dlpack(labels.as_tensor()).view(-1), self.device)
        return images, labels, torch.from_dlpack(ids.as_tensor()).view(-1)

    def _produce(self) -> Iterator[Batch]:
        if self._pipe is None:
            self._pipe = self._pipeline()
        elif self._pass is not None:
            self._drain()
        self._pass = self.plan.append(self.sampler.epoch, self.sampler.position, self.sampler.remaining())
        self._taken = 0
        # the runner queues its copies to the device on the stream the training thread runs on
        job = functools.partial(self._next, torch.cuda.current_stream(self.device)
                                if self.device.type == "cuda" else None)
        self.runner.start(job)
        while True:
            failure = None
            try:
                images, labels, ids = self.runner.result()
            except StopIteration:
                self._end_pass()
                return
            except Exception as e:  # noqa: BLE001 - a failed pipeline is not reused, whatever failed
                failure = self._failure(e)
            if failure is not None:  # raised out here, the one-line error holds no frame of the pipeline
                self._pipe, self._pass = None, None  # its feeder processes end with it
                raise failure
            self._taken += 1
            self.runner.start(job)  # the next batch while the caller trains on this one
            yield Batch(images, labels, ids)

    def feeder_pids(self) -> list[int]:
        """Processes running the feeder (none while it runs inline or before the first pass)."""
        pool = getattr(self._pipe, "_py_pool", None)  # DALI exposes the pool only as an attribute
        return list(pool.pids()) if pool is not None else []

    def _to_device(self, images: Any) -> torch.Tensor:
        """The images on the training device: a gpu pipeline's copied on the current stream, a cpu
        pipeline's tensor (sharing DALI's buffer, see _next) as it is on a cpu device. A cpu pipeline has no
        device_id, so its buffers are pageable: a copy to CUDA has read them when .to() returns."""
        if isinstance(images, TensorListGPU):
            t = images.as_tensor()
            dst = torch.empty(t.shape(), dtype=self.dtype, device=self.device)
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
            return dst
        return torch.from_dlpack(images.as_tensor()).to(self.device, non_blocking=True)

    def _failure(self, error: Exception) -> DataError | Exception:
        """One line naming the bad file: the feeder's own (raised inline, or as text from a worker process,
        whose traceback DALI forwards), else the file DALI could not decode among the batches in flight."""
        if isinstance(error, BadImage):
            return DataError(str(error))
        if "BadImage: " in str(error):
            return DataError(str(error).rsplit("BadImage: ", 1)[-1].strip().splitlines()[0])
        # out of memory (the runner's copy to the device) is not a bad file: the trainer reports it
        if not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError):
            return error
        suspects = self._in_flight()
        for i in suspects:
            try:
                with Image.open(io.BytesIO(self.index.encoded(i))) as img:  # a pack's: from its shard
                    img.convert("RGB")
            except BadImage as e:
                return DataError(str(e))
            except Exception as e:  # noqa: BLE001 - any failure marks the culprit
                return DataError(bad_image(self.index.path(i), e))
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return DataError(f"DALI failed on one of {len(suspects)} images in flight ({first}); run "
                         "python -m gcvit_data.verify on the dataset root to find bad files")

    def _in_flight(self) -> list[int]:
        """Sample ids of the batches the pipeline and the feeder may have been working on."""
        depth = self.data.prefetch + max(self.data.feeder_workers, self.data.prefetch) + 2  # + the runner's
        batches = [self.feeder.ids(self._pass, k)[1] for k in range(self._taken, self._taken + depth)]
        return [int(i) for ids in batches if ids is not None for i in ids]
