"""Where an export's own process spends its time: ``cProfile`` of the thread that runs the model, over one
export of synthetic birds, after a warm-up export of one batch. The decoding workers and the writer processes
are other processes and do not show; waiting for them does (``get`` of the DataLoader's queue, ``result`` of a
write's future). This is the picture of a GPU export, whose model runs in the export's own thread: a CPU export
explains in lane threads (``cpu_lanes``), which ``cProfile`` does not follow, so there it shows the wait only.

    python scripts/export_profile.py --device cuda --images 1024 --montage-format jpg
    python scripts/export_profile.py --device cuda --no-montage --writers 0 --out runs/profile.txt

The benchmarks' ResNet-18 (224 px, 200 classes, ξ = 3, random weights: the maps' content does not change the
work), bf16 autocast on CUDA as the export runs it. Prints the top functions by their own time and by their
cumulative time, and the export's seconds per image with and without the profiler.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcloss.core.device import resolve_device  # noqa: E402
from mcloss.core.files import atomic_write_text  # noqa: E402
from mcloss.core.model import build_model  # noqa: E402
from mcloss.data.synth import generate_dataset  # noqa: E402
from mcloss.explainability.export import ExportConfig, export, writer_processes  # noqa: E402


def synthetic_birds(root: Path, images: int, size: int) -> Path:
    """About ``images`` synthetic birds of ``size`` px under ``root`` (32 per class from 64); their images folder."""
    per_class = 32 if images >= 64 else max(1, images // 2)
    generate_dataset(root, max(2, images // per_class), per_class, size, 0)
    return root / "images"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=1024, help="synthetic birds to export (32 per class from 64)")
    p.add_argument("--size", type=int, default=224, help="their side in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4, help="decoding workers")
    p.add_argument("--writers", type=int, default=None, help="writer processes (default: the export's choice)")
    p.add_argument("--montage-format", default="png")
    p.add_argument("--no-montage", action="store_true")
    p.add_argument("--top", type=int, default=25, help="functions in each table")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model("resnet18", 200, xi=3, img_size=args.size).to(device).eval()
    with tempfile.TemporaryDirectory(prefix="mcloss-export-profile-") as tmp:
        work = Path(tmp)
        images = synthetic_birds(work / "birds", args.images, args.size)
        one = work / "one-batch"
        one.mkdir()
        for f in sorted(images.rglob("*.jpg"))[: args.batch_size]:
            (one / f.name).write_bytes(f.read_bytes())

        def run(folder: Path, profiler: cProfile.Profile | None = None) -> tuple[float, int]:
            config = ExportConfig(
                checkpoint="profile", input=[str(folder)], out=tempfile.mkdtemp(dir=work), batch_size=args.batch_size,
                workers=args.workers, device=str(device), montage=not args.no_montage,
                montage_format=args.montage_format, writers=args.writers,
            )  # fmt: skip
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            result = export(model, config, device=device, checkpoint_sha256="profile")
            if profiler is not None:
                profiler.disable()
            return time.perf_counter() - t0, result.written

        run(one)  # warm-up: the first export's one-off costs
        plain_s, n = run(images)
        profiler = cProfile.Profile()
        profiled_s, _ = run(images, profiler)
    config = ExportConfig(checkpoint="c", input=[], out="o", workers=args.workers, writers=args.writers)
    lines = [
        f"{n} images, {device}, batch {args.batch_size}, {args.workers} decoders, "
        f"{writer_processes(config, device) or 'no'} writer processes, "
        f"{'no montage' if args.no_montage else args.montage_format + ' montages'}",
        f"export: {plain_s * 1000 / n:.2f} ms per image; under the profiler {profiled_s * 1000 / n:.2f}",
    ]
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(args.top)
        lines += [f"--- by {order}", text.getvalue().split("\n\n", 2)[-1].rstrip()]
    report = "\n".join(lines)
    print(report)
    if args.out:
        atomic_write_text(args.out, report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
