"""``mcloss bench``: throughput of the explainability paths, as ratios measured in one run."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence

import torch

from mcloss.cli._common import (
    add_checkpoint,
    add_device,
    check_at_least,
    check_output,
    checkpoint_path,
    run,
    writing_to,
)
from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.device import resolve_device
from mcloss.core.errors import ParameterError
from mcloss.core.files import atomic_write_json
from mcloss.core.model import build_model
from mcloss.core.provenance import versions
from mcloss.explainability.benchmark import PATHS, PRECISIONS, format_table, run_benchmark

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcloss bench", description="Throughput of the explainability paths.")
    add_checkpoint(p)
    p.add_argument("--backbone", default=None, help="benchmark a randomly initialized model instead")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=30)
    p.add_argument("--xi", type=int, default=3)
    add_device(p, default="cpu")
    p.add_argument("--json", required=True, help="write the report here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of paths to time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="auto: bf16 autocast + channels-last weights on CUDA, fp32 on a CPU; or force fp32 / bf16 "
        "(batches run channels-last either way)",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=0,
        help="decoding workers of the export path (default 0: decoded in process)",
    )  # fmt: skip
    p.add_argument(
        "--export-batches", type=int, default=4,
        help="batches of synthetic-bird JPEGs the export path writes per repeat (default 4), so that drawing and "
        "writing overlap the next batch",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON report; 2 on a usage error."""
    return run("bench", build_parser(), argv, _bench)


def _bench(args: argparse.Namespace) -> int:
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ParameterError(f"paths: unknown {', '.join(unknown)} (choose from {', '.join(PATHS)})", parameter="paths")
    check_at_least(
        ("batch_size", args.batch_size, 1), ("repeats", args.repeats, 1), ("warmup", args.warmup, 0),
        ("workers", args.workers, 0), ("export_batches", args.export_batches, 1), ("classes", args.classes, 1),
        ("xi", args.xi, 1), ("threads", 1 if args.threads is None else args.threads, 1),
    )  # fmt: skip
    check_output(args.json, "--json", folder=False)  # before the benchmark runs, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.checkpoint and args.backbone:
        raise ParameterError("give checkpoint or backbone, not both", parameter=("checkpoint", "backbone"))
    if args.backbone:
        torch.manual_seed(0)
        model = build_model(args.backbone, args.classes, xi=args.xi, img_size=args.img_size)
        source = f"{args.backbone} random init, {args.classes} classes, xi={args.xi}, {args.img_size} px"
    else:
        ckpt = checkpoint_path(args.checkpoint)
        model = load_checkpoint(ckpt)
        source = str(ckpt)
    report = run_benchmark(
        model, device, batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, paths=paths,
        precision=args.precision, workers=args.workers, export_batches=args.export_batches,
    )  # fmt: skip
    report["setup"] = {
        "model": source,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "bf16": report["precision"] == "bf16",
        "channels_last": report["channels_last"],
        "export_workers": args.workers,
        "export_batches": args.export_batches,
        "versions": versions(),
    }
    print(f"{source} on {device} ({report['setup']['device_name']}), batch {args.batch_size}, median of {args.repeats}")
    print(format_table(report))
    with writing_to(args.json, "--json"):
        atomic_write_json(args.json, report)
    return 0
