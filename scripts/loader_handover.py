"""What a decoded batch costs to take back from the DataLoader's workers: the export's loader (``ImageFiles``,
``collate_items``: each shape's tensors in one shared-memory block) against the same batch as a plain list (each
image's tensor in a block of its own, handed over by a file descriptor of its own), alternated over the rounds.

    python scripts/loader_handover.py                     # 512 synthetic birds at 224 px, batches of 32, 2 workers
    python scripts/loader_handover.py --workers 4 --images 1024

The decoding itself is the same both ways; the difference is the main process's share: unpickling the batch and
mapping its blocks. On the H200 node that share cost the export 1.8 ms an image with a block per image
(``benchmarks/h200-2026-12-04-writers/profile_no_montage.txt``). Prints median milliseconds per image, wall
clock and the main process's CPU time (the workers' is not in it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcloss.core.model import build_model  # noqa: E402
from mcloss.data.files import collect_inputs  # noqa: E402
from mcloss.data.inputs import ImageFiles, collate_items  # noqa: E402
from mcloss.explainability.explanation import view_maker  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from export_profile import synthetic_birds  # noqa: E402


def plain_list(items: list) -> list:
    """The batch as a plain list: each image's tensor pickled, and shared, on its own."""
    return list(items)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    model = build_model("resnet18", 200, xi=3, img_size=args.size)
    with tempfile.TemporaryDirectory(prefix="mcloss-loader-") as tmp:
        files = collect_inputs([str(synthetic_birds(Path(tmp) / "birds", args.images, args.size))]).files
        dataset = ImageFiles(files, model.transform, view_maker("height", 160))
        times: dict[str, list[float]] = {"one block per batch": [], "one block per image": []}
        cpu: dict[str, list[float]] = {name: [] for name in times}
        for _ in range(args.rounds):
            for name, collate in zip(times, (collate_items, plain_list), strict=True):
                loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
                t0, c0 = time.perf_counter(), time.process_time()
                for items in loader:
                    torch.stack([item.x for _, item in items])  # what explain does with them
                times[name].append((time.perf_counter() - t0) * 1000 / len(files))
                cpu[name].append((time.process_time() - c0) * 1000 / len(files))
    print(f"{len(files)} images at {args.size} px, batches of {args.batch_size}, {args.workers} workers, "
          f"median of {args.rounds} rounds (worker start-up included)")  # fmt: skip
    for name, ms in times.items():
        print(f"{name:>20}: {statistics.median(ms):.2f} ms per image, of which the main process's CPU "
              f"{statistics.median(cpu[name]):.2f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
