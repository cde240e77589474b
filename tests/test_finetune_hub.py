"""Weights by name, offline for real: a Hub cache laid out as huggingface_hub writes it and torch.hub's
checkpoint folder, HF_HUB_OFFLINE=1; predict, export and mode=eval read hf-hub:ORG/REPO and timm:MODEL.TAG to
the same logits and scores as the file's path; a cached file is read without asking the network; a name not
in the cache, or a download that breaks, is one line; under DDP only local rank 0 downloads and a failure
reaches every rank. train.py from a name: test_finetune_train."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
import torch.multiprocessing as mp
from finetune_harness import (
    HUB_NAME,
    TINY_64,
    hub_env,
    resolve_on_rank,
    train,
    write_hub_cache,
    write_torch_hub_cache,
)
from huggingface_hub.errors import HfHubHTTPError
from timm.models import _registry as timm_registry
from timm.models import get_pretrained_cfg

from gcvit.engine.pretrained import read
from gcvit.export import load
from gcvit.models import hub
from gcvit.models.checkpoint import CheckpointError
from gcvit.predict import build, main
from gcvit_data.demo import ensure_demo_dataset

TIMM_NAME = "timm:gcvit_xxtiny.in1k"
URL = get_pretrained_cfg("gcvit_xxtiny.in1k").url  # timm 1.0.31: a GitHub release, no Hub repo


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An offline Hub home holding HUB_NAME (model.safetensors) for this process, and an empty TORCH_HOME;
    returns the cached file."""
    snapshot = write_hub_cache(tmp_path / "hf", arch=TINY_64)
    for key, value in {**hub_env(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}.items():
        monkeypatch.setenv(key, value)
    # huggingface_hub reads its environment once, at import: this process imported it already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def _logits(src) -> torch.Tensor:
    with torch.no_grad():
        return build(src)(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))


def test_the_cache_is_the_layout_huggingface_hub_reads(offline) -> None:
    (repo,) = huggingface_hub.scan_cache_dir().repos
    assert repo.repo_id == HUB_NAME.removeprefix("hf-hub:") and not huggingface_hub.scan_cache_dir().warnings
    (revision,) = repo.revisions
    assert revision.refs == {"main"} and [f.file_name for f in revision.files] == ["model.safetensors"]


def test_hub_name_gives_the_files_weights_and_logits(offline) -> None:
    by_name, by_path = read(HUB_NAME), read(offline)
    assert by_name.path == str(offline) and by_name.name == HUB_NAME and by_name.format == "timm"
    assert by_name.label == f"{HUB_NAME} ({offline})"
    assert torch.equal(_logits(by_name), _logits(by_path))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load(HUB_NAME).model(x), load(offline).model(x))  # python -m gcvit.export


def test_a_cached_file_is_read_without_asking_the_hub(offline, monkeypatch) -> None:
    """Online, HF_HUB_OFFLINE forgotten on a node without network: the cache answers, nothing retries."""
    def no_network(*args, **kwargs):
        raise AssertionError("asked the Hub for a cached file")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hf_hub_download", no_network)
    assert read(HUB_NAME).path == str(offline)


def test_pytorch_model_bin_when_the_repo_has_no_safetensors(tmp_path, monkeypatch) -> None:
    snapshot = write_hub_cache(tmp_path / "hf", filename="pytorch_model.bin")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert read(HUB_NAME).path == str(snapshot)


def test_predict_by_name_prints_what_it_prints_by_path(offline, capsys) -> None:
    images = ensure_demo_dataset() / "val" / "00_circle"
    assert main([HUB_NAME, str(images), "--json", "--topk", "3"]) == 0
    by_name = capsys.readouterr().out
    assert main([str(offline), str(images), "--json", "--topk", "3"]) == 0
    assert by_name == capsys.readouterr().out and len(by_name.splitlines()) == len(list(images.iterdir()))


def test_a_name_not_in_the_cache_is_one_line(offline, capsys) -> None:
    cache = huggingface_hub.constants.HF_HUB_CACHE
    nope = "hf-hub:timm/gcvit_nope.in1k"
    for name, rev in [(nope, ""), (f"{nope}@v2", " --revision v2")]:
        assert main([name, str(ensure_demo_dataset() / "val")]) == 1
        assert capsys.readouterr().err == (
            f"error: checkpoint={name}: not in the Hub cache {cache} and HF_HUB_OFFLINE=1; fetch it once "
            "where the Hub is reachable, with the same HF_HOME "
            f"(`hf download timm/gcvit_nope.in1k{rev}`), or pass the weights file's path\n")
    line = r"^model.pretrained=hf-hub:gcvit_tiny: a Hub name is hf-hub:ORG/REPO\[@REVISION\]; timm's GC ViT "
    with pytest.raises(CheckpointError, match=line):
        read("hf-hub:gcvit_tiny")


def test_a_broken_download_is_one_line(tmp_path, monkeypatch) -> None:
    """Online, not cached, the Hub answers 503: one line naming the name, the cache and what to do."""
    def unavailable(repo: str, filename: str, **kwargs):
        url = f"https://huggingface.co/{repo}/resolve/main/{filename}"
        response = httpx.Response(503, request=httpx.Request("GET", url))
        raise HfHubHTTPError(f"503 Server Error: Service Unavailable for url: {url}\nmore", response=response)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hf_hub_download", unavailable)
    with pytest.raises(CheckpointError) as e:
        read(HUB_NAME)
    assert str(e.value) == (
        f"model.pretrained={HUB_NAME}: fetching timm/gcvit_xxtiny.in1k/model.safetensors into the Hub cache "
        f"{tmp_path / 'hub'} failed (HfHubHTTPError: 503 Server Error: Service Unavailable for url: "
        "https://huggingface.co/timm/gcvit_xxtiny.in1k/resolve/main/model.safetensors); check the network "
        "and the free space there (HF_HOME / TORCH_HOME move it), retry, or pass the weights file's path")


def test_timm_name_reads_torch_hubs_cache(offline, tmp_path) -> None:
    """timm's cfg names a URL: the file timm would have downloaded, in torch.hub's folder; with or without
    the tag (timm's default tag)."""
    cached = write_torch_hub_cache(tmp_path / "torch", URL, arch=TINY_64)
    by_name = read(TIMM_NAME)
    assert by_name.path == str(cached) and by_name.label == f"{TIMM_NAME} ({cached})"
    assert read("timm:gcvit_xxtiny").path == str(cached)
    assert torch.equal(_logits(by_name), _logits(read(cached)))


def test_timm_name_with_a_hub_repo_reads_the_hub_cache(offline, monkeypatch) -> None:
    """A timm cfg that names a Hub repo (as timm's newer cfgs do) goes through the Hub cache."""
    cfg = get_pretrained_cfg("gcvit_xxtiny.in1k")
    monkeypatch.setitem(timm_registry._model_pretrained_cfgs, "gcvit_xxtiny.in1k",
                        dataclasses.replace(cfg, hf_hub_id=HUB_NAME.removeprefix("hf-hub:")))
    assert read(TIMM_NAME).path == str(offline)


def test_timm_name_not_cached_or_unknown_is_one_line(offline, tmp_path, capsys) -> None:
    path = tmp_path / "torch" / "hub" / "checkpoints" / URL.rsplit("/", 1)[1]
    assert main([TIMM_NAME, str(ensure_demo_dataset() / "val")]) == 1
    assert capsys.readouterr().err == (
        f"error: checkpoint={TIMM_NAME}: not in torch.hub's cache ({path}) and HF_HUB_OFFLINE=1; download "
        f"{URL} to that path where the network is reachable, with the same TORCH_HOME, or pass the weights "
        "file's path\n")
    with pytest.raises(CheckpointError, match=r"^model.pretrained=timm:gcvit_xxtiny.in22k: timm has no "
                       r"pretrained weights of that name \(its tags: gcvit_xxtiny.in1k\); timm's GC ViT "):
        read("timm:gcvit_xxtiny.in22k")


def test_eval_mode_by_name_scores_what_the_path_scores(tmp_path) -> None:
    snapshot = write_hub_cache(tmp_path / "hf", arch=TINY_64)
    geometry = ("model.img_size=64", "model.overrides.window_size=[2,2,4,2]")
    reports = []
    for run, checkpoint in (("by_name", HUB_NAME), ("by_path", snapshot)):
        res = train(tmp_path / run, "mode=eval", f"checkpoint={checkpoint}", *geometry,
                    f"eval.results_file={tmp_path / run / 'eval.json'}", env=hub_env(tmp_path / "hf"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert any(line.startswith(f"eval model weights of {snapshot} on val: top1 ")
                   for line in res.stdout.splitlines())
        reports.append(json.loads((tmp_path / run / "eval.json").read_text()))
    by_name, by_path = reports
    assert by_name["checkpoint"] == str(snapshot.resolve())  # the report records the blob it read
    assert by_name["sha256"] == by_path["sha256"] and by_name["checkpoint"] == by_path["checkpoint"]
    scores = [[{k: v for k, v in row.items() if k != "img_per_s"} for row in r["results"]] for r in reports]
    assert scores[0] == scores[1] and scores[0][0]["count"] > 0


@pytest.mark.slow
def test_one_download_per_node_and_a_failure_reaches_every_rank(tmp_path, monkeypatch) -> None:
    """Two ranks, online with the network faked, nothing cached: local rank 0 downloads each name once (a
    Hub repo, a timm URL), rank 1 reads the cache; a full disk on rank 0 is the same line on both ranks."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HF_HUB_OFFLINE": "0", "TORCH_HOME": str(tmp_path / "torch")}
    for key, value in env.items():  # the spawned ranks import huggingface_hub afresh
        monkeypatch.setenv(key, value)
    broken = "hf-hub:timm/gcvit_full.in1k"
    names = [HUB_NAME, TIMM_NAME, broken]
    mp.spawn(resolve_on_rank, args=(str(tmp_path), names, broken), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0[HUB_NAME]["downloads"] == ["timm/gcvit_xxtiny.in1k/model.safetensors"]
    assert r0[TIMM_NAME]["downloads"] == [URL]
    assert all(not r1[name]["downloads"] for name in names)
    assert r0[HUB_NAME]["result"] == r1[HUB_NAME]["result"] and Path(r1[HUB_NAME]["result"]).is_file()
    assert r0[TIMM_NAME]["result"] == r1[TIMM_NAME]["result"] == str(
        tmp_path / "torch" / "hub" / "checkpoints" / URL.rsplit("/", 1)[1])
    assert r0[broken]["result"] == r1[broken]["result"] == (
        f"error: model.pretrained={broken}: fetching timm/gcvit_full.in1k/model.safetensors into the Hub "
        f"cache {tmp_path / 'hf' / 'hub'} failed (OSError: [Errno 28] No space left on device); check the "
        "network and the free space there (HF_HOME / TORCH_HOME move it), retry, or pass the weights file's "
        "path")
