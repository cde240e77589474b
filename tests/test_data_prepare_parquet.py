"""python -m gcvit_data.prepare imagenet --from-parquet on real parquet files written by pyarrow in the layout
of Hugging Face's ILSVRC/imagenet-1k: images land byte for byte in the folder layout, the pack equals packing
that folder, labels are checked to be the sorted-wnid order, the test split is counted; a truncated JPEG and
a wrong label are one line naming file and row."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcvit_data.demo import draw
from gcvit_data.eval_sets import timm_info
from gcvit_data.index import DataError
from gcvit_data.pack import pack
from gcvit_data.prepare import main
from gcvit_data.prepare_parquet import imagenet_classes
from gcvit_data.shards import MANIFEST

WNIDS, LEMMAS = imagenet_classes()
LABELS = (0, 2, 5)  # three ImageNet classes; folder k of the prepared set is WNIDS[LABELS[k]]


def _jpeg(label: int, seed: int) -> bytes:
    buf = io.BytesIO()
    draw(label, np.random.default_rng(seed)).save(buf, format="JPEG", progressive=seed % 2 == 1)
    return buf.getvalue()


def _write(path: Path, rows: list[tuple[bytes | None, str | None, int]], names: list[str] | None) -> None:
    """One parquet file as `datasets` writes it: image {bytes, path}, label, the features in the metadata."""
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    meta = {"huggingface": json.dumps({"info": {"features": features}})} if names else None
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())], metadata=meta)
    table = pa.table({"image": [{"bytes": b, "path": p} for b, p, _ in rows],
                      "label": [lb for *_, lb in rows]}, schema=schema)
    pq.write_table(table, path, row_group_size=3)  # several row groups per file


def _dataset(root: Path, names: list[str] | None = None) -> dict[str, bytes]:
    """ROOT/data/{train-0000{0,1}-of-00002,validation-00000-of-00001,test-00000-of-00001}.parquet;
    returns {split/wnid/file name: bytes} of what the folder layout must hold."""
    names = names if names is not None else [LEMMAS[w] for w in WNIDS]
    (root / "data").mkdir(parents=True)
    want, train = {}, []
    for label in LABELS:
        for i in range(4):
            data, name = _jpeg(label, 10 * label + i), f"{WNIDS[label]}_{100 + i}.JPEG"
            train.append((data, name, label))
            want[f"train/{WNIDS[label]}/{name}"] = data
    _write(root / "data" / "train-00000-of-00002.parquet", train[::2], names)
    _write(root / "data" / "train-00001-of-00002.parquet", train[1::2], names)
    val = []
    for n, label in enumerate(LABELS * 2, start=1):
        data = _jpeg(label, 1000 + n)
        val.append((data, f"ILSVRC2012_val_{n:08d}_{WNIDS[label]}.JPEG", label))
        want[f"val/{WNIDS[label]}/ILSVRC2012_val_{n:08d}.JPEG"] = data
    _write(root / "data" / "validation-00000-of-00001.parquet", val, names)
    _write(root / "data" / "test-00000-of-00001.parquet",
           [(_jpeg(0, 2000 + n), f"ILSVRC2012_test_{n:08d}.JPEG", -1) for n in range(3)], names)
    return want


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def test_folder_holds_the_bytes_and_the_pack_is_that_folder_packed(tmp_path, capsys) -> None:
    want = _dataset(tmp_path / "hf")
    assert main(["imagenet", "--from-parquet", str(tmp_path / "hf"), "--out", str(tmp_path / "root"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert _files(tmp_path / "root") == want  # every image, bit for bit, under its wnid and standard name
    assert out[0] == ("labels: ImageNet-1K's standard sorted-wnid order (label 0 = n01440764 'tench'), "
                      "checked against the label names in their metadata and the wnid in every file name")
    assert out[1] == "test split: 3 unlabelled images (label -1) skipped"
    assert out[2].startswith(f"{tmp_path / 'root'}: 3 classes, 12 train and 6 val images; next: ")

    assert main(["imagenet", "--from-parquet", str(tmp_path / "hf"), "--out", str(tmp_path / "pack"),
                 "--format", "shards", "--shard-size", "20KB", "--quiet"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert not (tmp_path / ".pack.staged").exists()
    pack(tmp_path / "root", tmp_path / "packed", shard_size=20_000, progress=False)
    theirs, ours = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("packed", "pack"))
    shards = sum(len(s["shards"]) for s in ours["splits"].values())
    assert shards > 2 and f"12 train and 6 val images in {shards} shards (staged in " in line
    assert ours["splits"] == theirs["splits"] and ours["classes"] == theirs["classes"] == [
        WNIDS[label] for label in LABELS]
    assert _files(tmp_path / "pack").keys() == _files(tmp_path / "packed").keys()
    assert all((tmp_path / "pack" / f).read_bytes() == (tmp_path / "packed" / f).read_bytes()
               for f in _files(tmp_path / "packed") if f != MANIFEST)  # its source names the staging folder


def _damage(root: Path, row: int, **change) -> Path:
    """Rewrite train-00000-of-00002.parquet with one row changed (bytes / label); returns the file."""
    path = root / "data" / "train-00000-of-00002.parquet"
    table = pq.read_table(path)
    rows = [(r["image"]["bytes"], r["image"]["path"], r["label"]) for r in table.to_pylist()]
    data, name, label = rows[row]
    rows[row] = (change.get("data", data), name, change.get("label", label))
    _write(path, rows, [LEMMAS[w] for w in WNIDS])
    return path


def test_a_truncated_jpeg_is_one_line_or_left_out_with_check(tmp_path, capsys) -> None:
    _dataset(tmp_path / "hf")
    original = pq.read_table(tmp_path / "hf" / "data" / "train-00000-of-00002.parquet").to_pylist()[4]
    path = _damage(tmp_path / "hf", 4, data=original["image"]["bytes"][:-300])
    args = ["imagenet", "--from-parquet", str(tmp_path / "hf"), "--out", str(tmp_path / "root"), "--quiet"]
    with pytest.raises(DataError) as e:
        main(args)
    name = original["image"]["path"]
    assert str(e.value) == (f"data error: {path} row 4 ({name}): truncated JPEG (no end-of-image marker "
                            "after its last scan); download that file again, or pass --check to leave such "
                            "images out")
    assert main([*args, "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"\t{path} row 4 ({name})")
    assert "11 train and 6 val images (1 bad images left out)" in out[-1]
    assert not any(p.name == name for p in (tmp_path / "root").rglob("*"))


def test_a_wrong_label_is_one_line_naming_file_and_row(tmp_path) -> None:
    _dataset(tmp_path / "hf")
    path = _damage(tmp_path / "hf", 1, label=7)
    name = pq.read_table(path).to_pylist()[1]["image"]["path"]
    with pytest.raises(DataError) as e:
        main(["imagenet", "--from-parquet", str(tmp_path / "hf"), "--out", str(tmp_path / "root")])
    assert str(e.value) == (f"data error: {path} row 1 ({name}): label 7 is {WNIDS[7]} in the sorted-wnid "
                            f"order but the file name says {name[:9]}; the labels are not in the standard "
                            "order or the file is damaged (download it again)")
    assert not (tmp_path / "root" / "train").exists()  # nothing half-written looks finished


def test_label_names_in_another_order_are_refused(tmp_path) -> None:
    names = [LEMMAS[w] for w in WNIDS]
    names[1], names[2] = names[2], names[1]
    _dataset(tmp_path / "hf", names)
    with pytest.raises(DataError, match=r"train-00000-of-00002.parquet: label 1 is named 'great white shark"):
        main(["imagenet", "--from-parquet", str(tmp_path / "hf"), "--out", str(tmp_path / "root")])


def test_val_rows_without_a_path_are_named_by_position_only_in_the_standard_order(tmp_path, capsys) -> None:
    """ReaL labels find a val image by its ILSVRC2012_val_NNNNNNNN name: a row without one gets it from its
    position only where the labels show the standard order (they are ReaL's for those positions)."""
    _dataset(tmp_path / "hf")
    real = json.loads(timm_info("imagenet_real_labels.json"))
    labels = [r[0] if r else 0 for r in real[:8]]
    assert len({y for y, r in zip(labels, real) if r}) >= 6  # distinct: a shuffle moves them off ReaL's
    rows = [(_jpeg(y % 10, 3000 + i), None, y) for i, y in enumerate(labels)]
    val = tmp_path / "hf" / "data" / "validation-00000-of-00001.parquet"
    _write(val, rows, [LEMMAS[w] for w in WNIDS])
    args = ["imagenet", "--from-parquet", str(tmp_path / "hf"), "--quiet", "--out"]
    assert main([*args, str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("validation: 8 rows have no image path: named ILSVRC2012_val_NNNNNNNN.JPEG by their "
                      "position, the rows being in the standard order (100% of the labels are among ReaL's "
                      "for their position)")
    got = {k: v for k, v in _files(tmp_path / "root").items() if k.startswith("val/")}
    assert got == {f"val/{WNIDS[y]}/ILSVRC2012_val_{i + 1:08d}.JPEG": d for i, (d, _, y) in enumerate(rows)}

    _write(val, rows[::-1], [LEMMAS[w] for w in WNIDS])  # the same rows in another order
    assert main([*args, str(tmp_path / "shuffled")]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    assert line.startswith("validation: 8 rows have no image path and the rows are not in the standard order "
                           "(only ") and line.endswith("of the labels are among ReaL's for their position): "
                                                       "named <parquet file>_<row>.JPEG; ReaL labels (eval "
                                                       "ReaL) will not apply")
    names = sorted(p.name for p in (tmp_path / "shuffled" / "val").rglob("*.JPEG"))
    assert names == [f"validation-00000-of-00001_{r:08d}.JPEG" for r in range(8)]
