"""How an export's per-image writes scale over threads and over processes: ``write_explanation`` (draw the
montage, encode it, write it, the npz and the json) of explanations made beforehand, so that only the writes run.

    python scripts/writer_scaling.py                          # 64 images; 1, 2 and all CPUs; JPEG and PNG
    python scripts/writer_scaling.py --counts 1,2,4,8 --json runs/writers.json

A GPU export used to draw and write each batch's files in ``WRITER_THREADS`` threads beside the model's thread. On
the first H200 run (16 cores) PNG montages cost 12.3 ms an image once the export was running, about one image's
whole write on that CPU: its two writers hardly ran in parallel. This shows how much of a write holds the GIL:
threads are capped by that share (Amdahl), processes are not. Its numbers on the H200 are why a GPU export now
writes in processes (``mcloss.explainability.export.writer_processes``). Each count runs both ways, alternated over the rounds, into
fresh folders; the numbers are median milliseconds per image over the rounds and the speed-up over one thread.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcloss.core.checkpoint import default_checkpoint, load_checkpoint  # noqa: E402
from mcloss.core.files import atomic_write_json  # noqa: E402
from mcloss.core.processes import usable_cpus  # noqa: E402
from mcloss.data.inputs import prepare_image  # noqa: E402
from mcloss.explainability.explanation import Explanation, explain, view_maker  # noqa: E402
from mcloss.explainability.outputs import OutputOptions, write_explanation  # noqa: E402
from mcloss.explainability.render import Style  # noqa: E402

SAMPLES = REPO / "checkpoints" / "samples" / "images"


def _write(job: tuple[Explanation, object, str, str]) -> None:
    exp, view, base, fmt = job
    write_explanation(exp, Path(base), view=view, output=OutputOptions(montage_format=fmt, clean_temps=False))


def scaling(images: int, counts: Sequence[int], formats: Sequence[str], rounds: int, work: Path) -> list[dict]:
    """One row per (format, way, count): median ms per image over ``rounds`` and the speed-up over one thread."""
    model = load_checkpoint(default_checkpoint(), torch.device("cpu"))
    files = sorted(SAMPLES.glob("*.jpg"))
    files = (files * (images // len(files) + 1))[:images]
    make_view = view_maker("height", Style().tile_height)  # the export's montage view
    prepared = [prepare_image(model.transform, f, make_view) for f in files]
    explained = [(e, p.view) for e, p in zip(explain(model, prepared, "pred", batch_size=16), prepared, strict=True)]
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    ways = [("threads", 1)] + [(way, n) for n in counts if n > 1 for way in ("threads", "processes")]
    pools: dict[tuple[str, int], Executor] = {}
    times: dict[tuple[str, str, int], list[float]] = {}
    try:
        for way, n in ways:  # every pool started (and a process pool warmed) before any timing
            pools[way, n] = ThreadPoolExecutor(n) if way == "threads" else ProcessPoolExecutor(n, mp_context=context)
            if way == "processes":
                list(pools[way, n].map(_write, [(*explained[0], tempfile.mkdtemp(dir=work) + "/w", "jpg")] * n))
        for _ in range(rounds):
            for fmt in formats:
                for way, n in ways:
                    folder = tempfile.mkdtemp(dir=work)
                    jobs = [(e, v, f"{folder}/{i:04d}", fmt) for i, (e, v) in enumerate(explained)]
                    t0 = time.perf_counter()
                    list(pools[way, n].map(_write, jobs, chunksize=1 if way == "threads" else 4))
                    times.setdefault((fmt, way, n), []).append((time.perf_counter() - t0) * 1000 / len(jobs))
    finally:
        for pool in pools.values():
            pool.shutdown()
    rows = []
    for fmt in formats:
        one = statistics.median(times[fmt, "threads", 1])
        for way, n in ways:
            ms = statistics.median(times[fmt, way, n])
            rows.append({"format": fmt, "way": way, "count": n, "ms_per_image": ms, "speedup": one / ms})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--counts", default=None, help="comma-separated writer counts (default: 2 and the CPU count)")
    p.add_argument("--formats", default="jpg,png")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")] if args.counts else sorted({2, usable_cpus()})
    torch.set_num_threads(1)  # the writes use no torch; the explanations are made once, before any timing
    with tempfile.TemporaryDirectory(prefix="mcloss-writers-") as tmp:
        rows = scaling(args.images, counts, args.formats.split(","), args.rounds, Path(tmp))
    print(f"{args.images} images, {usable_cpus()} CPUs, median of {args.rounds} rounds")
    print(f"{'format':>6} {'way':>9} {'count':>5} {'ms/image':>9} {'speed-up':>8}")
    for r in rows:
        print(f"{r['format']:>6} {r['way']:>9} {r['count']:>5} {r['ms_per_image']:>9.2f} {r['speedup']:>7.2f}x")
    if args.json:
        atomic_write_json(args.json, {"cpus": usable_cpus(), "images": args.images, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
