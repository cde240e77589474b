"""Weights by Hub name, offline for real: a Hub cache laid out as huggingface_hub writes it, HF_HUB_OFFLINE=1;
predict, export and mode=eval read hf-hub:ORG/REPO to the same logits as the file's path; a name not in the
cache is one line; under DDP only local rank 0 asks the Hub. train.py from it: test_finetune_train."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.multiprocessing as mp
from finetune_harness import HUB_NAME, TINY_64, hub_env, resolve_on_rank, train, write_hub_cache

from gcvit.engine.pretrained import read
from gcvit.export import load
from gcvit.models.checkpoint import CheckpointError
from gcvit.predict import build, main
from gcvit_data.demo import ensure_demo_dataset


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An offline Hub home holding HUB_NAME (model.safetensors) for this process; returns the cached file."""
    snapshot = write_hub_cache(tmp_path / "hf", arch=TINY_64)
    for key, value in hub_env(tmp_path / "hf").items():
        monkeypatch.setenv(key, value)
    # huggingface_hub reads its environment once, at import: this process imported it already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_the_cache_is_the_layout_huggingface_hub_reads(offline) -> None:
    (repo,) = huggingface_hub.scan_cache_dir().repos
    assert repo.repo_id == HUB_NAME.removeprefix("hf-hub:") and not huggingface_hub.scan_cache_dir().warnings
    (revision,) = repo.revisions
    assert revision.refs == {"main"} and [f.file_name for f in revision.files] == ["model.safetensors"]


def test_hub_name_gives_the_files_weights_and_logits(offline) -> None:
    by_name, by_path = read(HUB_NAME), read(offline)
    assert by_name.path == str(offline) and by_name.name == HUB_NAME and by_name.format == "timm"
    assert by_name.label == f"{HUB_NAME} ({offline})"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(build(by_name)(x), build(by_path)(x))
        assert torch.equal(load(HUB_NAME).model(x), load(offline).model(x))  # python -m gcvit.export


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
    name = "hf-hub:timm/gcvit_nope.in1k"
    cache = huggingface_hub.constants.HF_HUB_CACHE
    assert main([name, str(ensure_demo_dataset() / "val")]) == 1
    assert capsys.readouterr().err == (
        f"error: checkpoint={name}: not in the Hub cache {cache} and HF_HUB_OFFLINE=1; fetch it once where "
        "the Hub is reachable, with the same HF_HOME (`hf download timm/gcvit_nope.in1k`), or pass the "
        "weights file's path\n")
    line = r"^model.pretrained=hf-hub:gcvit_tiny: a Hub name is hf-hub:ORG/REPO\[@REVISION\]; timm's GC ViT "
    with pytest.raises(CheckpointError, match=line):
        read("hf-hub:gcvit_tiny")


def test_eval_mode_scores_the_hub_name(tmp_path) -> None:
    snapshot = write_hub_cache(tmp_path / "hf", arch=TINY_64)
    res = train(tmp_path / "run", "mode=eval", f"checkpoint={HUB_NAME}", "model.img_size=64",
                "model.overrides.window_size=[2,2,4,2]", env=hub_env(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(line.startswith(f"eval model weights of {snapshot} on val: top1 ")
               for line in res.stdout.splitlines())
    report = json.loads((tmp_path / "run" / "eval" / "model.json").read_text())
    assert report["checkpoint"] == str(snapshot.resolve())  # the blob the snapshot links to


@pytest.mark.slow
def test_one_fetch_per_node_the_other_ranks_read_the_cache(tmp_path, monkeypatch) -> None:
    snapshot = write_hub_cache(tmp_path / "hf")
    for key, value in hub_env(tmp_path / "hf").items():  # the spawned ranks import huggingface_hub afresh
        monkeypatch.setenv(key, value)
    names = [HUB_NAME, "hf-hub:timm/gcvit_nope.in1k"]
    mp.spawn(resolve_on_rank, args=(str(tmp_path), names), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0[HUB_NAME]["calls"] == [{"file": "model.safetensors", "local_files_only": False,
                                      "after_rank0": False}]
    assert r1[HUB_NAME]["calls"] == [{"file": "model.safetensors", "local_files_only": True,
                                      "after_rank0": True}]
    assert r0[HUB_NAME]["result"] == r1[HUB_NAME]["result"] == str(snapshot)
    # nothing to read: local rank 0 tries both files, then every rank stops with the line (none waits forever)
    assert [c["local_files_only"] for c in r0[names[1]]["calls"]] == [False, False]
    assert r1[names[1]]["calls"] and all(c["local_files_only"] for c in r1[names[1]]["calls"])
    for r in (r0, r1):
        assert r[names[1]]["result"].startswith(f"error: model.pretrained={names[1]}: not in the Hub cache ")
