"""Shared by the fine-tuning tests: train.py on the tiny preset, small ImageFolder datasets with their own
class names made of demo images, and the Hugging Face Hub's and torch.hub's caches holding timm-format
weights."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from gcvit_data.demo import ensure_demo_dataset

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Arbitrary folder names (not wnids), each backed by one demo class: a 3-class task with its own names.
FOLDERS = {"apple pie": "00_circle", "Bolt-2": "03_cross", "zebra_stripes": "05_hstripes"}


# The reduced GC ViT of debug=tiny (32 px); HUB_NAME: timm's tag for the variant it reduces.
TINY = dict(dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=(4, 4, 2, 1), mlp_ratio=2.0)
# The same at 64 px in the default geometry (windows img/32, img/32, img/16, img/32), which tools that read
# the architecture off a foreign file's shapes (predict, export) assume.
TINY_64 = {**TINY, "window_size": (2, 2, 4, 2), "img_size": 64}
HUB_NAME = "hf-hub:timm/gcvit_xxtiny.in1k"


def train(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), "debug=tiny", f"trainer.output_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env or ENV)


def timm_weights(num_classes: int = 10, arch: dict | None = None) -> dict[str, torch.Tensor]:
    """timm-format weights of the model `arch` describes (default: debug=tiny's; seeded)."""
    import gcvit
    from gcvit.models.checkpoint import from_native

    torch.manual_seed(4)
    model = gcvit.create_model("gcvit_xxtiny", num_classes=num_classes, **(arch or {**TINY, "img_size": 32}))
    return {k: v.contiguous() for k, v in from_native(model.state_dict(), "timm").items()}


def write_hub_cache(hf_home: Path, repo: str = HUB_NAME.removeprefix("hf-hub:"), num_classes: int = 10,
                    filename: str = "model.safetensors", arch: dict | None = None) -> Path:
    """HF_HOME/hub as huggingface_hub lays it out: blobs/<sha256>, refs/main holding the commit, and
    snapshots/<commit>/<filename> linked to the blob, holding timm_weights(). Returns the snapshot file."""
    state = timm_weights(num_classes, arch)
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    tmp = folder / "blobs" / "incoming"
    if filename.endswith(".safetensors"):
        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    blob = tmp.rename(folder / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest())
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(Path("../..") / "blobs" / blob.name)
    return snapshot


def write_torch_hub_cache(torch_home: Path, url: str, arch: dict | None = None) -> Path:
    """TORCH_HOME/hub/checkpoints/<the URL's file name> holding timm_weights(), where timm's download of a
    pretrained cfg's URL puts it. Returns the file."""
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timm_weights(arch=arch), path)
    return path


def hub_env(hf_home: Path) -> dict[str, str]:
    """The test environment, offline, with `hf_home` as the Hub's home."""
    return {**ENV, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}


def make_folder_dataset(root: Path, per_class: dict[str, int], folders: dict[str, str] = FOLDERS,
                        gray: bool = False) -> Path:
    """ROOT/{train,val}/<name>/ with the first images of the demo class behind each name: links, or grayscale
    copies (`gray`: the demo's classes also differ in hue, which a grayscale task leaves to the shapes)."""
    demo = ensure_demo_dataset()
    for split, n in per_class.items():
        for name, src in folders.items():
            (root / split / name).mkdir(parents=True)
            for f in sorted((demo / split / src).iterdir())[:n]:
                if gray:
                    with Image.open(f) as img:
                        img.convert("L").convert("RGB").save(root / split / name / f.name, quality=95)
                else:
                    (root / split / name / f.name).symlink_to(f)
    return root


def resolve_on_rank(rank: int, out: str, names: list[str], broken: str) -> None:
    """One of two ranks of one node (gloo) resolving each name in turn, online but with the network faked:
    a download writes the file into its cache as huggingface_hub / torch.hub would, except that of the name
    `broken`, whose disk is full. Writes OUT/rank<r>.json with each name's result and its downloads."""
    from datetime import timedelta

    import torch.distributed as dist
    import torch.hub

    from gcvit.models import hub
    from gcvit.models.checkpoint import CheckpointError

    # a rank left waiting fails the test in a minute instead of torch's 30
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    downloads: list[str] = []

    def hub_download(repo: str, filename: str, **kwargs) -> str:
        downloads.append(f"{repo}/{filename}")
        if f"hf-hub:{repo}" == broken:
            raise OSError(28, "No space left on device")
        return str(write_hub_cache(Path(os.environ["HF_HOME"]), repo, filename=filename))

    def url_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        downloads.append(url)
        torch.save(timm_weights(), dst)

    hub.hf_hub_download, torch.hub.download_url_to_file = hub_download, url_download
    record = {}
    for name in names:
        downloads.clear()
        try:
            result = hub.resolve(name, "model.pretrained", local_rank=rank)
        except CheckpointError as e:
            result = f"error: {e}"
        record[name] = {"downloads": list(downloads), "result": result}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
