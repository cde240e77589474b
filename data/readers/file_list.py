"""File-list reader (data.train_list / data.val_list): images outside class folders, as `path,label` rows.

CSV or TSV (a tab in the first line), an optional `path,label` header; paths relative to data.root when it
is set, else to the list's own folder. Labels are class names (classes: the train list's names, sorted, as
ImageFolder sorts its folders) or integers 0..n-1 (classes named "0".."n-1"). Every problem is one line
naming the file and row.
"""
from __future__ import annotations

import csv
from pathlib import Path

from gcvit_data.index import DataError, Index


def _rows(path: Path, key: str) -> list[tuple[int, str, str]]:
    """(line number, image path, label) of every data row."""
    if not path.is_file():
        raise DataError(f"{key}={path} does not exist; pass a CSV or TSV file of `path,label` rows")
    with open(path, newline="") as f:
        text = f.read()
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    rows = []
    for n, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise DataError(f"{key}={path} line {n}: expected 2 fields `path{delimiter}label`, got "
                            f"{len(row)}: {delimiter.join(row)[:80]!r}")
        if n == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
            continue  # header
        rows.append((n, row[0].strip(), row[1].strip()))
    if not rows:
        raise DataError(f"{key}={path} lists no images")
    return rows


def read_list(path: str | Path, key: str, root: str | None = None, classes: list[str] | None = None) -> Index:
    """The Index of a list file; `classes`: the train list's (a val list's labels must be among them)."""
    path = Path(path).expanduser().resolve()
    rows = _rows(path, key)
    base = Path(root).expanduser().resolve() if root else path.parent
    if classes is None:
        labels = [label for _, _, label in rows]
        if all(label.isdigit() for label in labels):
            classes = [str(i) for i in range(max(map(int, labels)) + 1)]
        else:
            classes = sorted(set(labels))
    lookup = {c: i for i, c in enumerate(classes)}
    missing = []
    for n, image, label in rows:
        if label not in lookup and not (label.isdigit() and str(int(label)) in lookup):
            shown = ", ".join(classes[:5]) + (" ..." if len(classes) > 5 else "")
            raise DataError(f"{key}={path} line {n}: label {label!r} is not a class of data.train_list "
                            f"({len(classes)} classes: {shown})")
        if not (base / image).is_file():
            missing.append((n, image))
    if missing:
        n, image = missing[0]
        raise DataError(f"{key}={path}: {len(missing)} listed images do not exist, the first on line {n}: "
                        f"{base / image} (paths are relative to {base})")
    labels = [lookup[label] if label in lookup else lookup[str(int(label))] for _, _, label in rows]
    return Index(base, classes, [image for _, image, _ in rows], labels)
