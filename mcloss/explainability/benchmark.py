"""``mcloss bench``: throughput of the explainability paths, as ratios measured in one run.

Same model, batch and device for every path; warm-up, then the median of repeats (taken round-robin
over the paths); images/s. Paths:
``forward_only`` (model forward under inference_mode), ``channel_maps`` (F slices + peaks for the
predicted class), ``channel_maps_and_gradcam`` (plus fused Grad-CAM), ``captum_gradcam`` (a prediction
forward, then Captum ``LayerGradCam.attribute`` for the predicted class), ``pytorch_grad_cam``
(``GradCAM(model, [model.feature_layer])(x)``) and ``export_end_to_end`` (decode JPEGs, explain, write
PNG/NPZ/JSON to a temp dir). On CUDA: bf16 autocast, channels_last, synchronize before reading clocks.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mcloss.core.device import autocast, resolve_device
from mcloss.data.io import atomic_write_json

__all__ = ["PATHS", "GOALS", "time_path", "run_benchmark", "format_table", "build_parser", "main"]

PATHS = (
    "forward_only",
    "channel_maps",
    "channel_maps_and_gradcam",
    "captum_gradcam",
    "pytorch_grad_cam",
    "export_end_to_end",
)
#: (name, numerator, denominator, goal)
GOALS = (
    ("channel_maps / forward_only", "channel_maps", "forward_only", 0.9),
    ("channel_maps_and_gradcam / captum_gradcam", "channel_maps_and_gradcam", "captum_gradcam", 1.5),
    ("channel_maps_and_gradcam / pytorch_grad_cam", "channel_maps_and_gradcam", "pytorch_grad_cam", 2.0),
)


def time_path(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` for each repeat (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def _paths(model, x: torch.Tensor, device: torch.device, jpegs: Sequence[Path], tile_height: int) -> dict:
    from captum.attr import LayerGradCam

    from mcloss.explainability.explanation import explain_tensor
    from mcloss.explainability.export import ImageFiles, InputFile, write_outputs

    geos = [model.transform.geometry(x.shape[3], x.shape[2])] * x.shape[0]
    amp = device.type == "cuda"

    def forward_only():
        with torch.inference_mode(), autocast(device, enabled=amp):
            return model(x)

    def channel_maps():
        return explain_tensor(model, x, geos, "pred", gradcam=False, device=device)

    def channel_maps_and_gradcam():
        return explain_tensor(model, x, geos, "pred", gradcam=True, method="fused", device=device)

    def captum_gradcam():
        with torch.inference_mode(), autocast(device, enabled=amp):
            pred = model(x).argmax(dim=1)
        with autocast(device, enabled=amp):
            cam = LayerGradCam(model, model.feature_layer).attribute(
                x, target=pred.tolist(), relu_attributions=True
            )
        return cam.float().cpu()

    def pytorch_grad_cam():
        from pytorch_grad_cam import GradCAM

        with autocast(device, enabled=amp), GradCAM(model, [model.feature_layer]) as cam:
            return cam(x, targets=None)  # None: the predicted class

    files = [InputFile(str(p), p.name) for p in jpegs]
    dataset = ImageFiles(files, model.transform, tile_height)
    options = {"colormap": "inferno", "alpha": 0.5, "shared_scale": False, "tile_height": tile_height, "topk": 5}

    def export_end_to_end():
        with tempfile.TemporaryDirectory(prefix="mcloss-bench-") as tmp:
            items = [dataset[i] for i in range(len(dataset))]
            xb = torch.stack([it["x"] for it in items])
            exps = explain_tensor(model, xb, [it["geometry"] for it in items], "pred", device=device)
            for f, it, e in zip(files, items, exps, strict=True):
                write_outputs(Path(tmp) / f.key, f.source, it["thumb"], e, model.class_names, options)

    return {
        "forward_only": forward_only,
        "channel_maps": channel_maps,
        "channel_maps_and_gradcam": channel_maps_and_gradcam,
        "captum_gradcam": captum_gradcam,
        "pytorch_grad_cam": pytorch_grad_cam,
        "export_end_to_end": export_end_to_end,
    }


def run_benchmark(
    model,
    device: torch.device,
    *,
    batch_size: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    paths: Sequence[str] = PATHS,
    tile_height: int = 224,
    seed: int = 0,
) -> dict:
    """Time each path on one random batch; returns images/s, raw times and the goal ratios."""
    from PIL import Image

    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    size = model.transform.input_size or (model.config["img_size"],) * 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *size, generator=gen).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mcloss-bench-in-") as tmp:
        rng = np.random.default_rng(seed)
        jpegs = []
        for i in range(batch_size):
            p = Path(tmp) / f"img{i:03d}.jpg"
            Image.fromarray(rng.integers(0, 256, (size[0] * 3 // 2, size[1] * 2, 3), dtype=np.uint8)).save(p)
            jpegs.append(p)
        fns = _paths(model, x, device, jpegs, tile_height)
        for name in paths:
            time_path(fns[name], device, warmup=warmup, repeats=0)
        # round-robin repeats, so a change in machine load hits every path alike
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name in paths:
                times[name] += time_path(fns[name], device, warmup=0, repeats=1)
        for name in paths:
            med = statistics.median(times[name])
            results[name] = {"images_per_s": batch_size / med, "median_s": med, "times_s": times[name]}
    ratios = {}
    for label, num, den, goal in GOALS:
        if num in results and den in results:
            r = results[num]["images_per_s"] / results[den]["images_per_s"]
            ratios[label] = {"ratio": r, "goal": goal, "met": r >= goal}
    return {"paths": results, "ratios": ratios}


def format_table(report: dict) -> str:
    """A plain-text table of images/s and the goal ratios."""
    lines = [f"{'path':<28} {'images/s':>10} {'median ms':>10}"]
    for name, r in report["paths"].items():
        lines.append(f"{name:<28} {r['images_per_s']:>10.2f} {r['median_s'] * 1000:>10.1f}")
    lines.append("")
    for label, r in report["ratios"].items():
        lines.append(f"{label:<46} {r['ratio']:>6.2f}x  (goal >= {r['goal']}x: {'met' if r['met'] else 'NOT met'})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcloss bench", description="Throughput of the explainability paths.")
    p.add_argument("--checkpoint", default=None, help="mcloss checkpoint (default checkpoints/default.safetensors)")
    p.add_argument("--backbone", default=None, help="benchmark a randomly initialized model instead")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=30)
    p.add_argument("--xi", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--json", required=True, help="write the report here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of paths to time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON report; 2 on a usage error."""
    args = build_parser().parse_args(argv)
    try:
        from mcloss import __version__
        from mcloss.core.checkpoint import load_checkpoint
        from mcloss.core.model import build_model
        from mcloss.explainability.export import DEFAULT_CHECKPOINT

        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        unknown = sorted(set(paths) - set(PATHS))
        if unknown:
            raise ValueError(f"--paths: unknown {', '.join(unknown)} (choose from {', '.join(PATHS)})")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        if args.checkpoint and args.backbone:
            raise ValueError("give --checkpoint or --backbone, not both")
        if args.backbone:
            torch.manual_seed(0)
            model = build_model(args.backbone, args.classes, xi=args.xi, img_size=args.img_size)
            source = f"{args.backbone} random init, {args.classes} classes, xi={args.xi}, {args.img_size} px"
        else:
            ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
            if not ckpt.is_file():
                hint = "" if args.checkpoint else " (the default; pass --checkpoint or --backbone)"
                raise ValueError(f"{ckpt}: checkpoint not found{hint}")
            model = load_checkpoint(ckpt)
            source = str(ckpt)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"mcloss bench: error: {exc}", file=sys.stderr)
        return 2
    report = run_benchmark(
        model, device, batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, paths=paths
    )
    report["setup"] = {
        "model": source,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "bf16": device.type == "cuda",
        "versions": {"mcloss": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    print(f"{source} on {device} ({report['setup']['device_name']}), batch {args.batch_size}, "
          f"median of {args.repeats}")
    print(format_table(report))
    atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
