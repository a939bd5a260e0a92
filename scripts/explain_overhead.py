"""What one ``explain_tensor`` call costs beyond the model's forward: the host's work of turning one pass into
Explanations (the guard, targets, softmaxes, the copy of the target groups, the peaks and one GroupMaps and
Explanation per image), at several batch sizes.

    python scripts/explain_overhead.py                          # ResNet-18, 224 px, 200 classes, ξ = 3
    python scripts/explain_overhead.py --batches 1,32 --json runs/overhead.json

For each batch it prints the median milliseconds of ``forward_only`` (the bench's path), of ``channel_maps``
(the bench's path: predicted class, channel maps only) and of ``after_forward``: the same call with the
backbone and head's pass replaced by its stored result, so that only the rest runs. On a GPU the
``forward_only`` path is the device's time, and ``after_forward`` the host's work (with the few small device
operations after the pass: the MC logits, the softmaxes, the copy of the target groups), which the device
waits for; their sum against ``channel_maps`` shows whether anything else is left.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcloss.core.device import autocast, resolve_device  # noqa: E402
from mcloss.core.files import atomic_write_json  # noqa: E402
from mcloss.core.model import MCModel, build_model  # noqa: E402
from mcloss.explainability import explanation  # noqa: E402
from mcloss.explainability.benchmark import time_path  # noqa: E402


def overhead(model: MCModel, device: torch.device, batches: Sequence[int], repeats: int, amp: bool = False) -> list[dict]:
    """One row per batch size: median seconds of forward_only, channel_maps and after_forward (module doc)."""
    model = model.to(device).eval()
    size = model.transform.input_size or (model.config["img_size"],) * 2
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, *size, generator=gen).to(device)
        geos = [model.transform.geometry(x.shape[3], x.shape[2])] * batch

        def forward_only(x=x):
            with torch.inference_mode(), autocast(device, enabled=amp):
                return model(x)

        def channel_maps(x=x, geos=geos):
            return explanation.explain_tensor(model, x, geos, "pred", maps=("channels",), device=device, amp=amp)

        stored = explanation._forward(model, x, device, amp=amp, fused=False)

        def after_forward(x=x, geos=geos, stored=stored):
            real = explanation._forward  # swapped by hand: mock.patch would add its own cost to the timing
            explanation._forward = lambda *a, **k: stored
            try:
                return channel_maps(x, geos)
            finally:
                explanation._forward = real

        paths = {"forward_only": forward_only, "channel_maps": channel_maps, "after_forward": after_forward}
        for fn in paths.values():
            time_path(fn, device, warmup=2, repeats=0)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):  # alternated, so that a change in load hits every path alike
            for name, fn in paths.items():
                times[name] += time_path(fn, device, warmup=0, repeats=1)
        row = {"batch": batch} | {f"{name}_s": statistics.median(t) for name, t in times.items()}
        row["after_forward_per_image_s"] = row["after_forward_s"] / batch
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--xi", type=int, default=3)
    parser.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = build_model(args.backbone, args.classes, xi=args.xi, img_size=args.img_size)
    rows = overhead(model, device, [int(b) for b in args.batches.split(",")], args.repeats)
    print(f"{args.backbone} {args.img_size} px, {args.classes} classes, xi {args.xi}, {device}: median ms per call")
    print(f"{'batch':>5} {'forward_only':>13} {'channel_maps':>13} {'after_forward':>14} {'per image':>10}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['forward_only_s'] * 1e3:>13.2f} {r['channel_maps_s'] * 1e3:>13.2f}"
            f" {r['after_forward_s'] * 1e3:>14.2f} {r['after_forward_per_image_s'] * 1e3:>10.3f}"
        )
    if args.json:
        atomic_write_json(args.json, {"device": str(device), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
