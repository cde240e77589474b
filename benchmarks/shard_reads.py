"""Random single-image reads: WebDataset shards (one pread, as a pack) against Hugging Face parquet read in
place (the image's row group read, then sliced), and what the shard reader's bounded set of open files costs
where the open-file limit cannot hold every shard.

    python benchmarks/shard_reads.py --images 3000 --row-group 1000 --shards 32 --reads 300

Writes JPEGs of ImageNet's mean size (~110 kB) into an image folder, the same bytes as WebDataset shards
(gcvit_data.bench_streams.write_wds, read by gcvit_data.readers.wds) and as one parquet file with
ILSVRC/imagenet-1k's columns (image {bytes, path}, label) in row groups of --row-group rows, then reads
--reads random images from each; everything is in the page cache (warm: the read path is timed, not the
disk, which only widens the gap: parquet reads a whole row group per image). Last, the open-file limit is
lowered (hard, this process only) to leave room for half the shards, so the reader closes and reopens
them (docs/imagenet.md#open-files). Prints one JSON line; --json-out also writes it.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from gcvit_data.bench_streams import write_wds
from gcvit_data.readers import load_index
from gcvit_data.shards import RESERVE_FDS, open_descriptors


def jpegs(n: int, rng: np.random.Generator) -> list[bytes]:
    """n distinct JPEGs of ~110 kB (smoothed noise at 500x375, quality 90)."""
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (94, 125, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-24, 24, (375, 500, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def per_read(read: Callable[[int], bytes], ids: list[int]) -> tuple[float, float]:
    """(median, mean) microseconds of one read."""
    times = []
    for i in ids:
        tic = time.perf_counter()
        read(i)
        times.append(time.perf_counter() - tic)
    return round(1e6 * statistics.median(times), 1), round(1e6 * statistics.fmean(times), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--row-group", type=int, default=1000, help="parquet rows per row group")
    ap.add_argument("--shards", type=int, default=32, help="WebDataset shards the images are written to")
    ap.add_argument("--reads", type=int, default=300, help="random single-image reads timed per form")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder" / "train" / "c0"
        folder.mkdir(parents=True)
        data = jpegs(args.images, rng)
        for k, d in enumerate(data):
            (folder / f"{k:06d}.JPEG").write_bytes(d)
        shards = write_wds({"train": load_index(folder.parents[1], "train")}, Path(tmp) / "wds",
                           per_shard=-(-args.images // args.shards))
        wds = load_index(shards, "train")
        table = pa.table({"image": [{"bytes": d, "path": f"{k:06d}.JPEG"} for k, d in enumerate(data)],
                          "label": [0] * len(data)})
        pq.write_table(table, Path(tmp) / "train.parquet", row_group_size=args.row_group)
        pf = pq.ParquetFile(Path(tmp) / "train.parquet")

        def parquet_read(i: int) -> bytes:
            group, row = divmod(i, args.row_group)
            return pf.read_row_group(group, columns=["image"]).column(0)[row]["bytes"].as_py()

        ids = rng.integers(0, args.images, args.reads).tolist()
        assert all(wds.encoded(i) == parquet_read(i) == data[i] for i in ids[:20])
        result = {"bench": "data.random_read", "images": args.images,
                  "mean_image_kb": round(sum(map(len, data)) / len(data) / 1e3, 1),
                  "row_group_rows": args.row_group, "row_group_mb": round(
                      pf.metadata.row_group(0).total_byte_size / 1e6, 1), "wds_shards": args.shards}
        opens = wds.reader.opens
        result["wds_us"] = per_read(wds.encoded, ids)
        result["wds_opens_per_read"] = round((wds.reader.opens - opens) / args.reads, 3)
        result["parquet_row_group_us"] = per_read(parquet_read, ids[:max(1, args.reads // 10)])
        result["parquet_vs_wds"] = round(result["parquet_row_group_us"][0] / result["wds_us"][0], 1)
        wds.reader.close()
        room = open_descriptors() + RESERVE_FDS + args.shards // 2  # half the shards stay open
        resource.setrlimit(resource.RLIMIT_NOFILE, (room, room))
        bounded = load_index(shards, "train")
        opens = bounded.reader.opens
        result["wds_half_open_us"] = per_read(bounded.encoded, ids)
        result["wds_half_open_opens_per_read"] = round((bounded.reader.opens - opens) / args.reads, 3)
    line = json.dumps(result)
    print(line)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
