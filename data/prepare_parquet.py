"""ImageNet-1K as Hugging Face `datasets` parquet (ILSVRC/imagenet-1k) -> our folder layout or a pack.

    python -m gcvit_data.prepare imagenet --from-parquet DIR --out ROOT [--format folder|shards] [--check]

DIR is the downloaded dataset: DIR/data/{train,validation,test}-*.parquet (or those files in DIR itself),
columns `image` {bytes, path} and `label`. The JPEG bytes are written unchanged, row group by row group, to
ROOT/{train,val}/<wnid>/<file name>. `--format shards` packs that folder (written beside OUT and removed
after: the pack writer needs the samples in sorted order, the parquet rows are in the dataset's order), so
the pack is byte-identical to `--format folder` + `python -m gcvit_data.pack`. Labels are checked to be
ImageNet's sorted-wnid order (the label names in the files' metadata, and the wnid every file name
carries); the test split (label -1) is counted and skipped. Each split appears atomically: a rerun skips
the finished ones. Converted, not read in place: one image out of a row group costs reading the whole
group, ~1000x a pread of the image (benchmarks/shard_reads.py; docs/imagenet.md says by how much).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from gcvit_data.eval_sets import timm_info
from gcvit_data.image_header import MAGIC, check_bytes
from gcvit_data.imagenet import Prepared
from gcvit_data.index import DataError

SPLITS = {"train": "train", "validation": "val"}  # the dataset's split names -> ours
BATCH_ROWS = 256  # rows decoded from a row group at a time: memory stays at a few tens of MB
WNID = re.compile(r"n\d{8}")
HF_VAL_NAME = re.compile(r"(ILSVRC2012_val_\d{8})_n\d{8}(\.JPEG)")  # the dataset appends the wnid
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")
VAL_IMAGES = 50000  # ILSVRC2012_val_00000001 .. 00050000, the order ReaL's labels follow
AGREEMENT = 0.5  # in the standard order ~9 in 10 labels are among ReaL's; shuffled, ~1 in 1000


def _parquet():
    try:  # pyarrow is the optional [prepare] extra: imported only when a parquet file is read
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install 'gcvit-train[prepare]'") from None
    return pq


def find_files(src: Path) -> dict[str, list[Path]]:
    """{train|validation|test: its parquet files, sorted} under SRC/data or SRC."""
    folder = src / "data" if (src / "data").is_dir() else src
    found = {split: sorted(folder.glob(f"{split}-*.parquet")) for split in (*SPLITS, "test")}
    for split in SPLITS:
        if not found[split]:
            raise DataError(f"{folder} holds no {split}-*.parquet; point --from-parquet at the downloaded "
                            "ILSVRC/imagenet-1k folder (the one holding data/)")
    return found


def imagenet_classes() -> tuple[list[str], dict[str, str]]:
    """ImageNet-1K's wnids in sorted order (the standard label order) and each one's first lemma (timm's)."""
    wnids = timm_info("imagenet_synsets.txt").split()
    lemma = dict(line.split("\t", 1) for line in timm_info("imagenet_synset_to_lemma.txt").splitlines())
    return wnids, {w: lemma[w].split(",")[0].strip() for w in wnids}


def check_label_names(path: Path, schema_metadata: dict | None, wnids: list[str],
                      lemmas: dict[str, str]) -> bool:
    """Whether the file's `datasets` metadata names its labels; a one-line DataError when those names are
    not ImageNet-1K's classes in sorted-wnid order."""
    raw = (schema_metadata or {}).get(b"huggingface")
    names = json.loads(raw).get("info", {}).get("features", {}).get("label", {}).get("names") if raw else None
    if not names:
        return False
    theirs = [n.split(",")[0].strip().lower() for n in names]
    ours = [lemmas[w].lower() for w in wnids]
    if theirs != ours:
        i = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        got = repr(names[i]) if i < len(names) else "none"
        raise DataError(f"{path}: label {i} is named {got}, ImageNet-1K's sorted-wnid order has {wnids[i]} "
                        f"{lemmas[wnids[i]]!r} there ({len(names)} label names); this is not "
                        "ILSVRC/imagenet-1k's label order, so its labels would name other classes")
    return True


def rows(path: Path, wnids: list[str]) -> Iterator[tuple[int, str, str | None, bytes]]:
    """(row, wnid, original file name or None, image bytes) of every row of a labelled parquet file."""
    pf = _parquet().ParquetFile(path)
    schema = pf.schema_arrow
    image = schema.field("image").type if "image" in schema.names else None
    if "label" not in schema.names or image is None or not {"bytes", "path"} <= {f.name for f in image}:
        raise DataError(f"{path} has columns {schema.names}; expected image {{bytes, path}} and label "
                        "(ILSVRC/imagenet-1k's parquet)")
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["image", "label"]):
        images = batch.column("image")
        for data, name, label in zip(images.field("bytes").to_pylist(), images.field("path").to_pylist(),
                                     batch.column("label").to_pylist()):
            yield row, row_class(path, row, name, label, wnids), name or None, data
            row += 1


def row_class(path: Path, row: int, name: str | None, label: int | None, wnids: list[str]) -> str:
    """The wnid of a row: its label's, checked against the wnid its file name carries."""
    where = f"{path} row {row}" + (f" ({name})" if name else "")
    if label is None or not 0 <= label < len(wnids):
        raise DataError(f"{where}: label {label} is not a class index 0..{len(wnids) - 1}; the file is not "
                        "ImageNet-1K's train or validation split, or it is damaged (download it again)")
    named = WNID.search(Path(name).name) if name else None
    if named and named.group() != wnids[label]:
        raise DataError(f"{where}: label {label} is {wnids[label]} in the sorted-wnid order but the file "
                        f"name says {named.group()}; the labels are not in the standard order or the file "
                        "is damaged (download it again)")
    return wnids[label]


def unnamed_rows(files: list[Path], split: str) -> tuple[bool, str | None]:
    """Rows without an image path: whether they are named ILSVRC2012_val_NNNNNNNN.JPEG by their
    position (validation rows in the standard order: the named rows carry their position and the labels
    agree with ReaL's, which follow that order), and the line that says so (None when every row is named)."""
    names, labels = [], []
    for f in files:  # the path and label columns only: the image bytes are not read here
        table = _parquet().ParquetFile(f).read(columns=["image.path", "label"])
        names += table.column(0).combine_chunks().field("path").to_pylist()
        labels += table.column(1).to_pylist()
    missing = sum(not n for n in names)
    fallback = "named <parquet file>_<row>.JPEG"
    if not missing:
        return False, None
    if split != "validation":
        return False, f"{split}: {missing} rows have no image path: {fallback}"
    real = json.loads(timm_info("imagenet_real_labels.json"))
    moved = next((n for i, n in enumerate(names) if n and (m := VAL_NUMBER.search(n)) and int(m[1]) != i + 1),
                 None)
    judged = [y in real[i] for i, y in enumerate(labels[:VAL_IMAGES]) if real[i]]
    agree = sum(judged) / max(1, len(judged))
    if moved is None and len(names) <= VAL_IMAGES and agree >= AGREEMENT:
        return True, (f"validation: {missing} rows have no image path: named ILSVRC2012_val_NNNNNNNN.JPEG "
                      f"by their position, the rows being in the standard order ({agree:.0%} of the labels "
                      "are among ReaL's for their position)")
    why = (f"{moved} is not at its position" if moved else f"{len(names)} rows" if len(names) > VAL_IMAGES
           else f"only {agree:.0%} of the labels are among ReaL's for their position")
    return False, (f"validation: {missing} rows have no image path and the rows are not in the standard "
                   f"order ({why}): {fallback}; ReaL labels (eval ReaL) will not apply")


def problem(data: bytes | None, check: bool) -> str | None:
    """Why the bytes are not an image to keep: what every row gets (bytes that are an image, and a JPEG
    that ends after its last scan) and, with `check`, the full decode of gcvit_data.verify."""
    if not data:
        return "zero bytes"
    kind = next((k for magic, k in MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        return "not an image"
    # a JPEG's end-of-image marker follows its last start-of-scan (0xFF 0xD9/0xDA never occur in entropy data)
    last_scan = data.rfind(b"\xff\xda")
    if kind == "JPEG" and (last_scan < 0 or data.rfind(b"\xff\xd9") < last_scan):
        return "truncated JPEG (no end-of-image marker after its last scan)"
    return check_bytes(data, ".JPEG") if check else None


def _problems(datas: list[bytes | None]) -> list[str | None]:
    return [problem(d, check=True) for d in datas]


Checker = Callable[[list[bytes | None]], list[str | None]]  # problem() of each of a batch of images


def write_split(files: list[Path], split: str, out: Path, wnids: list[str], *, check: bool,
                checker: Checker, progress: bool, by_position: bool = False
                ) -> tuple[int, list[tuple[str, str]]]:
    """Write OUT/<split>/<wnid>/<name> from the rows of `files`, atomically; returns (images written,
    [(reason, FILE row N (name))] of the rows --check left out). Without --check a bad row is an error.
    A row without a name is ILSVRC2012_val_NNNNNNNN.JPEG by its position in the split with `by_position`,
    else <parquet file>_<row>.JPEG."""
    final, tmp = out / split, out / f".{split}.partial"
    if final.is_dir():  # finished by an earlier run
        return sum(1 for f in final.rglob("*") if f.is_file()), []
    shutil.rmtree(tmp, ignore_errors=True)
    written, bad, first = 0, [], 0
    bar = tqdm(desc=f"{split} images", unit="img", disable=not progress, file=sys.stderr)
    for path in files:
        batch: list[tuple[int, str, str | None, bytes]] = []
        where = first if by_position else None
        for item in rows(path, wnids):
            batch.append(item)
            if len(batch) == BATCH_ROWS:
                written += _write_batch(batch, path, where, tmp, check, checker, bad)
                bar.update(len(batch))
                batch = []
        written += _write_batch(batch, path, where, tmp, check, checker, bad)
        bar.update(len(batch))
        first += _parquet().ParquetFile(path).metadata.num_rows
    bar.close()
    tmp.mkdir(exist_ok=True)  # a split whose every row was left out is still a (finished) split
    os.replace(tmp, final)
    return written, bad


def _write_batch(batch: list[tuple[int, str, str | None, bytes]], path: Path, first: int | None, tmp: Path,
                 check: bool, checker: Checker, bad: list[tuple[str, str]]) -> int:
    """Write one batch of rows (an unnamed one named by its position first + row when first is given);
    returns how many were written."""
    n = 0
    for (row, wnid, name, data), reason in zip(batch, checker([item[3] for item in batch])):
        if not name:  # see unnamed_rows()
            name = (f"{path.stem}_{row:08d}.JPEG" if first is None else
                    f"ILSVRC2012_val_{first + row + 1:08d}.JPEG")
        where = f"{path} row {row} ({name})"
        if reason:
            if not check:
                raise DataError(f"{where}: {reason}; download that file again, or pass --check to leave such "
                                "images out")
            bad.append((reason, where))
            continue
        target = tmp / wnid / HF_VAL_NAME.sub(r"\1\2", Path(name).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(target, "xb") as f:
                f.write(data)
        except FileExistsError:
            raise DataError(f"{where}: {target.name} appears twice in class {wnid}; the parquet files "
                            "overlap (a split downloaded twice?)") from None
        n += 1
    return n


def prepare_from_parquet(src: Path, out: Path, *, check: bool = False, workers: int = 1,
                         progress: bool = True) -> Prepared:
    """Write OUT/{train,val}/<wnid>/ from the parquet download SRC (`prepare imagenet --from-parquet`)."""
    found = find_files(src)
    wnids, lemmas = imagenet_classes()
    named = [check_label_names(f, _parquet().read_schema(f).metadata, wnids, lemmas)
             for split in SPLITS for f in found[split]]
    how = ("the label names in their metadata and the wnid in every file name" if all(named) else
           "the wnid in every file name (no label names in their metadata)")
    out.mkdir(parents=True, exist_ok=True)
    counts, bad, notes = {}, [], []
    with mp.get_context("spawn").Pool(workers) if check and workers > 1 else nullcontext() as pool:

        def checker(datas: list[bytes | None]) -> list[str | None]:
            if pool is None:
                return [problem(d, check) for d in datas]
            step = -(-len(datas) // workers)  # the full decode is the slow part: spread over the workers
            return [r for part in pool.map(_problems, [datas[k:k + step] for k in range(0, len(datas), step)])
                    for r in part]

        for split, ours in SPLITS.items():
            by_position = False
            if not (out / ours).is_dir():  # not finished by an earlier run
                by_position, note = unnamed_rows(found[split], split)
                notes += [note] if note else []
            counts[ours], left_out = write_split(found[split], ours, out, wnids, check=check, checker=checker,
                                                 progress=progress, by_position=by_position)
            bad += left_out
    test = sum(_parquet().ParquetFile(f).metadata.num_rows for f in found["test"])
    notes = [f"labels: ImageNet-1K's standard sorted-wnid order (label 0 = {wnids[0]} {lemmas[wnids[0]]!r}), "
             f"checked against {how}",
             f"test split: {test} unlabelled images (label -1) skipped" if found["test"] else
             "test split: no test-*.parquet (nothing to skip)", *notes]
    return Prepared(len(list((out / "train").iterdir())), counts, bad, notes)
