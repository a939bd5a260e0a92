"""Every ``mcloss bench`` path with the backbone on NCHW batches (before) and on channels-last batches (now,
:meth:`mcloss.core.model.MCModel.forward_features`), alternated in one process, so that both layouts meet the
same machine state.

    python scripts/layout_bench.py                       # 3 rounds of both layouts, the bench's defaults
    python scripts/layout_bench.py --rounds 2 --paths forward_only,export_jpg --json runs/layouts.json

Prints each round's images/s per path and layout, then the median over the rounds and the goal ratios of each
layout. The NCHW layout is obtained by running ``model.features`` on the batch as it comes (the code before the
change); nothing else differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcloss.core.checkpoint import load_checkpoint  # noqa: E402
from mcloss.core.device import keep_tensors_in_heap  # noqa: E402
from mcloss.core.model import MCModel  # noqa: E402
from mcloss.explainability.benchmark import GOALS, PATHS, run_benchmark  # noqa: E402

LAYOUTS = ("nchw", "channels_last")


def _nchw_features(self: MCModel, x: torch.Tensor) -> torch.Tensor:
    return self.features(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "default.safetensors"))
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two layouts")
    p.add_argument("--repeats", type=int, default=5, help="the bench's repeats within each run")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of bench paths")
    p.add_argument("--json", default=None, help="also write every round's numbers here")
    args = p.parse_args(argv)
    keep_tensors_in_heap()  # as the mcloss command does at start
    model = load_checkpoint(args.checkpoint, torch.device("cpu"))
    paths = [s for s in args.paths.split(",") if s]
    channels_last = MCModel.forward_features
    rates: dict[str, dict[str, list[float]]] = {layout: {name: [] for name in paths} for layout in LAYOUTS}
    try:
        for round_ in range(1, args.rounds + 1):
            for layout in LAYOUTS:
                MCModel.forward_features = _nchw_features if layout == "nchw" else channels_last
                report = run_benchmark(model, torch.device("cpu"), paths=paths, repeats=args.repeats)
                for name in paths:
                    rates[layout][name].append(report["paths"][name]["images_per_s"])
                row = "  ".join(f"{name} {rates[layout][name][-1]:.1f}" for name in paths)
                print(f"round {round_} {layout:13s} {row}", flush=True)
    finally:
        MCModel.forward_features = channels_last
    print(f"\nmedian images/s over {args.rounds} rounds (torch threads: {torch.get_num_threads()})")
    print(f"{'path':28s} {'nchw':>9s} {'channels_last':>14s} {'speed-up':>9s}")
    median = {layout: {name: statistics.median(v) for name, v in rates[layout].items()} for layout in LAYOUTS}
    for name in paths:
        a, b = median["nchw"][name], median["channels_last"][name]
        print(f"{name:28s} {a:9.1f} {b:14.1f} {b / a:8.2f}x")
    print(f"\n{'ratio (of the medians)':48s} {'nchw':>6s} {'channels_last':>14s}  goal")
    for label, num, den, goal in GOALS:
        if num in paths and den in paths:
            r = [median[layout][num] / median[layout][den] for layout in LAYOUTS]
            print(f"{label:48s} {r[0]:5.2f}x {r[1]:13.2f}x  >= {goal}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rates, "median": median}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
