"""Eval sets (val, ReaL, V2, A, R, Sketch): layouts, label spaces, each set's scoring rule, ECE."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from gcvit.engine.distributed import DistEnv
from gcvit.engine.eval_scores import Predictions, expected_calibration_error, predict, score
from gcvit_data.eval_sets import build_eval_set, timm_info
from gcvit_data.index import DataError, Index
from gcvit_data.loaders import Batch

WNIDS = timm_info("imagenet_synsets.txt").split()
A_WNIDS = timm_info("imagenet_a_synsets.txt").split()
CPU = DistEnv(0, 1, 0, torch.device("cpu"))


def _jpegs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 8), (90, 20, 200)).save(folder / n)


def _preds(top5: list[list[int]], labels: list[int], conf: list[float] | None = None) -> Predictions:
    n = len(labels)
    return Predictions(torch.arange(n), torch.tensor(top5), torch.tensor(conf or [0.5] * n),
                       torch.tensor(labels))


def test_v2_folders_are_class_indices_ordered_as_numbers(tmp_path: Path) -> None:
    for c in ("0", "2", "10", "999"):
        _jpegs(tmp_path / c, ["a.jpeg"])
    es = build_eval_set("v2", data_root=None, set_root=str(tmp_path), classes=WNIDS)
    assert es.index.labels == [0, 2, 10, 999]  # as strings "10" would sort before "2"
    assert es.index.files[2] == "10/a.jpeg"


def test_a_and_r_restrict_to_their_200_classes_and_reject_others(tmp_path: Path) -> None:
    _jpegs(tmp_path / A_WNIDS[0], ["x.jpg"])
    _jpegs(tmp_path / A_WNIDS[5], ["y.jpg"])
    es = build_eval_set("a", data_root=None, set_root=str(tmp_path), classes=WNIDS)
    assert len(es.subset) == 200 and es.subset == sorted(WNIDS.index(w) for w in A_WNIDS)
    assert es.index.labels == [WNIDS.index(A_WNIDS[0]), WNIDS.index(A_WNIDS[5])]
    outsider = next(w for w in WNIDS if w not in A_WNIDS)
    _jpegs(tmp_path / outsider, ["z.jpg"])
    with pytest.raises(DataError, match=f"{outsider} is not one of ImageNet-A's 200 classes"):
        build_eval_set("a", data_root=None, set_root=str(tmp_path), classes=WNIDS)


def test_predictions_restricted_to_a_subset_map_back_to_model_classes() -> None:
    subset = [3, 7, 9]

    class Fixed(torch.nn.Module):  # the best logit overall is class 0, outside the subset
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(len(x), 10)
            logits[:, 0], logits[:, 7], logits[:, 9] = 9.0, 5.0, 4.0
            return logits

    batches = [Batch(torch.zeros(2, 3, 4, 4), torch.tensor([7, 9]), torch.tensor([1, 0]))]
    p = predict(Fixed(), batches, CPU, "fp32", subset=subset)
    assert p.ids.tolist() == [0, 1] and p.labels.tolist() == [9, 7]  # ordered by sample id
    assert p.top5[:, :3].tolist() == [[7, 9, 3]] * 2
    res = score(build_subset_set(subset), p)
    assert (res["top1"], res["count"]) == (50.0, 2)


def build_subset_set(subset: list[int]):
    from gcvit_data.eval_sets import EvalSet

    return EvalSet("a", Index(Path("."), WNIDS[:10], ["x", "y"], [9, 7]), "restricted", subset=subset)


def test_real_counts_any_label_of_the_set_and_excludes_empty_sets(tmp_path: Path) -> None:
    val = tmp_path / "val"
    _jpegs(val / WNIDS[0], ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"])
    _jpegs(val / WNIDS[1], ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000004.JPEG"])
    _jpegs(tmp_path / "train" / WNIDS[0], ["t.JPEG"])
    _jpegs(tmp_path / "train" / WNIDS[1], ["t.JPEG"])
    labels = tmp_path / "real.json"
    labels.write_text("[[], [1, 5], [0], [7]]")
    es = build_eval_set("real", data_root=str(tmp_path), set_root=None, classes=WNIDS[:2],
                        real_file=str(labels))
    assert es.real == [[], [0], [1, 5], [7]]  # val index order is by class folder: 1, 3, 2, 4
    res = score(es, _preds([[0, 1], [1, 0], [5, 1], [1, 7]], [0, 0, 1, 1]))
    # image 1 (empty set) is left out; image 2 hits with 5, a label its set has besides its val label 1;
    # images 3 and 4 miss at top-1 but hold their label in the top 5
    assert (res["count"], res["excluded"]) == (3, 1)
    assert res["top1"] == pytest.approx(100 / 3) and res["top5"] == 100.0
    assert len(json.loads(timm_info("imagenet_real_labels.json"))) == 50_000  # timm ships the label sets


def test_real_needs_the_original_file_names(tmp_path: Path) -> None:
    _jpegs(tmp_path / "val" / WNIDS[0], ["renamed.jpg"])
    _jpegs(tmp_path / "train" / WNIDS[0], ["t.JPEG"])
    with pytest.raises(DataError, match="renamed.jpg: ReaL needs the original val file names"):
        build_eval_set("real", data_root=str(tmp_path), set_root=None, classes=WNIDS[:1])


def test_sets_outside_val_need_a_1000_class_model_and_their_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs its folder: set eval.sketch_root"):
        build_eval_set("sketch", data_root=None, set_root=None, classes=WNIDS)
    with pytest.raises(DataError, match="scores ImageNet-1K classes, but the model has 10"):
        build_eval_set("v2", data_root=None, set_root=str(tmp_path), classes=WNIDS[:10])
    with pytest.raises(DataError, match="'imagenet-c' is not one of val, real, v2, a, r, sketch"):
        build_eval_set("imagenet-c", data_root=None, set_root=None, classes=WNIDS)


def test_a_missing_or_repeated_image_fails_the_exactly_once_check() -> None:
    es = build_subset_set([3, 7, 9])
    p = _preds([[7], [7]], [7, 7])
    p.ids = torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match="yielded 2 images \\(1 distinct\\) for 2"):
        score(es, p)


def test_ece_matches_a_hand_computed_value_and_is_zero_when_calibrated() -> None:
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, False, True, True])
    # bins (0.9, 0.9667]: acc 0.5 vs conf 0.95; (0.5333, 0.6]: acc 1.0 vs conf 0.55; each holds half
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0


def test_val_reports_per_class_accuracy_and_ece() -> None:
    from gcvit_data.eval_sets import EvalSet

    es = EvalSet("val", Index(Path("."), ["n1", "n2"], ["a", "b", "c"], [0, 1, 1]), "val")
    res = score(es, _preds([[0, 1], [0, 1], [1, 0]], [0, 1, 1], [0.9, 0.8, 0.7]))
    assert res["per_class"] == {"n1": {"top1": 100.0, "count": 1}, "n2": {"top1": 50.0, "count": 2}}
    assert res["top1"] == pytest.approx(200 / 3) and 0.0 <= res["ece"] <= 1.0
