"""Check the CUDA path and measure it: one JSON with the benchmark, an AMP training run with resume, the
app's single-image latency, the export's per-image cost and the montage encoders.

On a GPU (the sizes the issue asks for):
- ``mcloss bench`` paths for ResNet-18 at 224 px and ResNet-50 at 448 px (200 classes, the official ξ split),
  in fp32 and in bf16 + channels_last (the export paths in fp32 only);
- a 2-epoch MC-Loss training run on synthetic birds with bf16 autocast, then ``--resume`` to a third epoch;
- app-style latency: one uploaded image explained for its top-2 classes (the app's call), median of repeats;
- the export's steady state: the marginal milliseconds per image of ``export`` (no montage, JPEG and PNG
  montages; its own writer processes, then two writer threads) from an export of one batch and one of many,
  beside the forward's; the bench's export paths time
  whole exports of a few batches, so on a GPU their fixed cost (worker start-up, the plan) weighs in;
- the host's share of an explain call: ``channel_maps`` (5 ms over the forward on the first H200 run, for 32
  images or 16) beside the same call after a stored forward (scripts/explain_overhead.py);
- the export's writes over threads and over processes (scripts/writer_scaling.py): how far writer threads and
  writer processes go on the machine's cores;
- montage encoding (issue 27): a batch of 16 real montages encoded as PNG and as JPEG on the CPU (mcloss's
  encoders), and as JPEG by ``torchvision.io.encode_jpeg`` on the device (nvJPEG on CUDA: the montages are
  uploaded, encoded there, and only the bytes come back), with each JPEG's PSNR against the PNG.

``--smoke`` runs the same code at tiny sizes on whatever device there is (the test suite runs it on the
CPU). Clocks are read after ``torch.cuda.synchronize``. Run from the repository root:
``python scripts/gpu_check.py --out runs/gpu_check.json`` (``--stages steady_export,writer_scaling`` runs only
those parts: a lent GPU's minutes are few, and the bench alone takes six of them).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mcloss.cli.train import main as train_main
from mcloss.core.device import resolve_device
from mcloss.core.files import atomic_write_json
from mcloss.core.model import build_model
from mcloss.core.provenance import versions
from mcloss.data.synth import generate_dataset
from mcloss.explainability.benchmark import EXPORTS, PATHS, run_benchmark, time_path
from mcloss.explainability.explanation import explain
from mcloss.training.run_dir import read_metrics

#: (backbone, input side, classes, ξ (None: the native width split unevenly), batch) per benchmarked model.
FULL_MODELS = (("resnet18", 224, 200, 3, 32), ("resnet50", 448, 200, None, 16))
SMOKE_MODELS = (("resnet18", 32, 4, 2, 2),)
#: Decoding workers of the export path on a GPU machine, where the CPU cores are not the model's.
EXPORT_WORKERS = 4
#: The report's parts, in the order they run (``--stages`` picks some).
STAGES = ("bench", "training", "app_latency", "steady_export", "montage_encoding", "explain_overhead", "writer_scaling")
#: The issue's goals on a GPU: (label, numerator path, denominator path, least ratio).
GOALS = (
    ("channel_maps / forward_only", "channel_maps", "forward_only", 0.9),
    ("export_end_to_end / forward_only", "export_end_to_end", "forward_only", 0.5),
    ("export_jpg / forward_only", "export_jpg", "forward_only", 0.7),  # issue 27: montages composed and encoded there
)
APP_LATENCY_GOAL_S = 0.1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_record(device: torch.device) -> dict:
    """What ran: device name, torch, CUDA and cuDNN versions."""
    record = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "versions": versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record |= {
            "name": torch.cuda.get_device_name(device),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        record["name"] = platform.processor() or platform.machine()
    return record


def bench_models(device: torch.device, models: Sequence[tuple], repeats: int, warmup: int) -> list[dict]:
    """Every benchmark path for each model in fp32, and in bf16 + channels_last all but the export paths, with
    the goal ratios.

    The export paths cost most of the time here (on an H200 about 85 s a row against a few for the rest), and
    their speed is the host's: 77 images/s for JPEG montages in fp32 and in bf16 alike (2026-12-04).
    """
    rows = []
    for backbone, size, classes, xi, batch in models:
        for precision in ("fp32", "bf16") if device.type == "cuda" else ("fp32",):  # bf16 autocasts on CUDA only
            torch.manual_seed(0)
            model = build_model(backbone, classes, xi=xi, img_size=size)
            report = run_benchmark(
                model, device, batch_size=batch, repeats=repeats, warmup=warmup, precision=precision,
                paths=PATHS if precision == "fp32" else tuple(p for p in PATHS if p not in EXPORTS),
                workers=EXPORT_WORKERS if device.type == "cuda" else 0,
            )  # fmt: skip
            paths = report["paths"]
            goals = {
                label: {"ratio": paths[num]["images_per_s"] / paths[den]["images_per_s"], "goal": goal}
                for label, num, den, goal in GOALS
                if num in paths
            }
            for g in goals.values():
                g["met"] = g["ratio"] >= g["goal"]
            rows.append({
                "backbone": backbone, "img_size": size, "classes": classes, "xi": xi, "batch_size": batch,
                "precision": report["precision"], "channels_last": report["channels_last"],
                "images_per_s": {name: p["images_per_s"] for name, p in paths.items()},
                "median_s": {name: p["median_s"] for name, p in paths.items()},
                "ratios": {k: v["ratio"] for k, v in report["ratios"].items()}, "goals": goals,
            })  # fmt: skip
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def train_and_resume(device: torch.device, work: Path, smoke: bool) -> dict:
    """Two AMP epochs of MC-Loss on synthetic birds, then ``--resume`` to a third; seconds per epoch."""
    classes, per_class, size = (3, 6, 32) if smoke else (12, 100, 224)
    data = work / "birds"
    generate_dataset(data, classes, per_class, size, 0)
    out = work / "run"
    common = ["--data", str(data), "--out", str(out), "--backbone", "resnet18", "--xi", "3",
              "--batch-size", "4" if smoke else "32", "--img-size", str(size), "--workers", "0" if smoke else "4",
              "--device", str(device), "--optimizer", "adamw", "--lr", "0.001", "--schedule", "cosine"]  # fmt: skip
    if device.type != "cuda":
        common.append("--no-amp")
    t0 = time.perf_counter()
    first = train_main([*common, "--epochs", "2"])
    t1 = time.perf_counter()
    resumed = train_main([*common, "--epochs", "3", "--resume"])
    t2 = time.perf_counter()
    rows = read_metrics(out / "metrics.csv")
    return {
        "classes": classes, "per_class": per_class, "img_size": size, "amp": device.type == "cuda",
        "exit_codes": [first, resumed], "epochs": [int(r["epoch"]) for r in rows],
        "seconds_first_2_epochs": t1 - t0, "seconds_resumed_epoch": t2 - t1,
        "test_acc_fc": [r.get("test_acc_fc") for r in rows],
        "ok": first == 0 and resumed == 0 and [int(r["epoch"]) for r in rows] == [1, 2, 3],
    }  # fmt: skip


def app_latency(device: torch.device, repeats: int, smoke: bool) -> dict:
    """The app's call for one upload, ``explain(model, image, "top2")`` (maps + fused Grad-CAM), in seconds."""
    from mcloss.core.checkpoint import default_checkpoint, load_checkpoint

    checkpoint = default_checkpoint()
    if checkpoint.is_file() and not smoke:
        model, source = load_checkpoint(checkpoint, device), str(checkpoint)
    else:
        torch.manual_seed(0)
        model, source = build_model("resnet18", 4, xi=2, img_size=32).to(device).eval(), "resnet18 random init"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    for _ in range(3):
        explain(model, image, "top2", device=device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        explain(model, image, "top2", device=device)
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"model": source, "image": [640, 480], "median_s": median, "times_s": times, "goal_s": APP_LATENCY_GOAL_S,
            "met": median <= APP_LATENCY_GOAL_S}  # fmt: skip


def steady_export(device: torch.device, work: Path, smoke: bool, decoders: int = EXPORT_WORKERS) -> dict:
    """Milliseconds per image of the export once running, per montage choice, against the forward's.

    Each choice exports one batch and then every image (``(all - one batch) / (images - batch)``: the export's
    fixed cost cancels), into fresh folders, with the benchmarks' ResNet-18.
    """
    from mcloss.core.device import autocast
    from mcloss.explainability.export import ExportConfig, export, writer_processes

    classes, per_class, size, batch = (2, 4, 32, 4) if smoke else (32, 32, 224, 32)
    generate_dataset(work / "birds", classes, per_class, size, 0)
    images = sorted((work / "birds" / "images").rglob("*.jpg"))
    one = work / "one-batch"
    one.mkdir()
    for f in images[:batch]:
        (one / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(0)
    backbone, side, n_classes, xi, _ = SMOKE_MODELS[0] if smoke else FULL_MODELS[0]
    model = build_model(backbone, n_classes, xi=xi, img_size=side).to(device).eval()
    amp = device.type == "cuda"
    x = torch.randn(batch, 3, side, side, device=device)

    def forward():
        with torch.inference_mode(), autocast(device, enabled=amp):
            model(x)

    forward_ms = statistics.median(time_path(forward, device, warmup=3, repeats=20)) * 1000 / batch  # as the bench's
    workers = decoders if device.type == "cuda" else 0

    def seconds(folder: Path, options: dict) -> tuple[float, int]:
        config = ExportConfig(
            checkpoint="gpu-check", input=[str(folder)], out=tempfile.mkdtemp(dir=work), batch_size=batch,
            workers=workers, device=str(device), **options,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = export(model, config, device=device, amp=amp, checkpoint_sha256="gpu-check")
        elapsed = time.perf_counter() - t0
        if result.errors:
            raise RuntimeError(f"the steady-state export failed: {result.errors[0]}")
        return elapsed, result.written

    writers = writer_processes(ExportConfig(checkpoint="c", input=[], out="o", workers=workers), device)
    report: dict = {
        "images": len(images), "batch_size": batch, "workers": workers, "forward_ms": forward_ms,
        "writer_processes": writers,
    }  # fmt: skip
    # the export's own writers (processes where it starts them) and writer threads (writers=0), one after the other
    choices = {
        f"{name}{way}": {**options, **extra}
        for name, options in (("no_montage", {"montage": False}), ("jpg", {"montage_format": "jpg"}), ("png", {}))
        for way, extra in (("", {}), ("_threads", {"writers": 0}))
    }  # fmt: skip
    seconds(one, choices["jpg"])  # a warm-up: the first export's one-off costs would shrink the difference
    for name, options in choices.items():
        one_s, one_n = seconds(one, options)
        all_s, all_n = seconds(work / "birds" / "images", options)
        ms = (all_s - one_s) * 1000 / (all_n - one_n)
        report[name] = {"one_batch_s": one_s, "all_s": all_s, "ms_per_image": ms, "over_forward": forward_ms / ms}
    return report


def montage_encoding(device: torch.device, repeats: int, smoke: bool) -> dict:
    """Milliseconds per montage for PNG and JPEG on the CPU and JPEG by torchvision on ``device``, batch of 16;
    and per montage drawn and encoded as JPEG on the CPU against composed and encoded on ``device``
    (:func:`~mcloss.explainability.render.device.device_montage_jpeg`), with the PSNRs against the CPU montage."""
    import io

    import torchvision

    from mcloss.core.checkpoint import default_checkpoint, load_checkpoint
    from mcloss.data.io import DEFAULT_QUALITY, encode_image
    from mcloss.data.synth import class_definitions, instance_rng, render_bird
    from mcloss.explainability.render import Style, explanation_montage
    from mcloss.explainability.render.device import device_montage, device_montage_jpeg

    checkpoint = default_checkpoint()
    if checkpoint.is_file() and not smoke:
        model = load_checkpoint(checkpoint, device)
    else:
        torch.manual_seed(0)
        model = build_model("resnet18", 4, xi=2, img_size=32).to(device).eval()
    birds = class_definitions(12, "varied")
    montages, explained = [], []
    for i in range(2 if smoke else 16):
        image = render_bird(birds[i % len(birds)], 224, instance_rng(1, i), 1.6).image
        exp = explain(model, Image.fromarray(image), "pred", device=device)
        explained.append((image, exp))
        montages.append(exp.montage(0, Style(), image=image))
    tensors = [torch.from_numpy(m).permute(2, 0, 1).contiguous() for m in montages]

    def timed(fn) -> float:
        fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000 / len(montages)

    def on_device():
        return torchvision.io.encode_jpeg([t.to(device, non_blocking=True) for t in tensors], quality=DEFAULT_QUALITY)

    report = {
        "montages": len(montages), "size": list(montages[0].shape[:2]), "quality": DEFAULT_QUALITY,
        "png_cpu_ms": timed(lambda: [encode_image(m) for m in montages]),
        "jpg_cpu_ms": timed(lambda: [encode_image(m, "jpg", full_chroma=True) for m in montages]),
        "jpg_torchvision_ms": timed(on_device), "torchvision_device": str(device),
        # the whole montage: drawn and encoded on the CPU, or composed and encoded on the device (issue 27)
        "draw_jpg_cpu_ms": timed(
            lambda: [encode_image(explanation_montage(i, e, 0, Style()), "jpg", full_chroma=True) for i, e in explained]
        ),
        "draw_jpg_device_ms": timed(
            lambda: [device_montage_jpeg(i, e, 0, Style(), device=device, quality=DEFAULT_QUALITY) for i, e in explained]
        ),
    }  # fmt: skip
    report["draw_jpg_device_over_cpu"] = report["draw_jpg_device_ms"] / report["draw_jpg_cpu_ms"]
    composed = [device_montage(i, e, 0, Style(), device=device).cpu().numpy() for i, e in explained]
    report["device_montage_psnr_db"] = _min_psnr(composed, montages)
    jpegs = [device_montage_jpeg(i, e, 0, Style(), device=device, quality=DEFAULT_QUALITY) for i, e in explained]
    report["device_jpg_psnr_db"] = _min_psnr([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs], montages)
    decoded = [np.asarray(Image.open(io.BytesIO(bytes(b.cpu().numpy()))).convert("RGB")) for b in on_device()]
    report["jpg_torchvision_psnr_db"] = _min_psnr(decoded, montages)
    return report


def explain_host(device: torch.device, smoke: bool) -> list[dict]:
    """``channel_maps`` against ``forward_only`` and the host's share of the call (scripts/explain_overhead.py)
    for the first bench model in fp32, at batches of 1, 32 and 128: whether the gap is the host's work."""
    from explain_overhead import overhead

    backbone, side, classes, xi, _ = (SMOKE_MODELS if smoke else FULL_MODELS)[0]
    model = build_model(backbone, classes, xi=xi, img_size=side)
    return overhead(model, device, (1, 2) if smoke else (1, 32, 128), 1 if smoke else 20)


def writer_scaling(smoke: bool) -> dict:
    """The export's per-image writes over threads and over processes on this machine's CPUs
    (scripts/writer_scaling.py): how many writer processes a GPU export should start on such a node."""
    from writer_scaling import scaling

    from mcloss.core.processes import usable_cpus

    counts = (2,) if smoke else sorted({2, 4, 8, max(2, min(14, usable_cpus() - 2))})
    with tempfile.TemporaryDirectory(prefix="mcloss-gpu-check-") as tmp:
        rows = scaling(4 if smoke else 64, counts, ("jpg", "png"), 1 if smoke else 3, Path(tmp))
    return {"cpus": usable_cpus(), "rows": rows}


def _min_psnr(pictures: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """The lowest PSNR (dB) of each picture against its reference."""
    mse = [np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(pictures, references, strict=True)]
    return float(min(10 * np.log10(255.0**2 / max(e, 1e-12)) for e in mse))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON report")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (what the test suite runs on a CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per path (default 10, smoke 1)")
    p.add_argument(
        "--export-workers", type=int, default=EXPORT_WORKERS, help="decoding workers of the steady export on a GPU"
    )
    p.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated stages to run, in this order: {','.join(STAGES)}"
    )
    args = p.parse_args(argv)
    wanted = args.stages.split(",")
    if unknown := sorted(set(wanted) - set(STAGES)):
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    device = resolve_device(args.device)
    repeats = args.repeats or (1 if args.smoke else 10)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke, "device": device_record(device)}

    def stage(name: str, measure) -> None:
        """One part of the report, saved as soon as it is measured: a run cut short keeps what it finished."""
        if name not in wanted:
            return
        t0 = time.perf_counter()
        report[name] = measure()
        report.setdefault("stage_seconds", {})[name] = time.perf_counter() - t0
        atomic_write_json(args.out, report)
        print(f"{name}: {report['stage_seconds'][name]:.1f} s", file=sys.stderr, flush=True)

    stage("bench", lambda: bench_models(device, SMOKE_MODELS if args.smoke else FULL_MODELS, repeats, 0 if args.smoke else 2))
    with tempfile.TemporaryDirectory(prefix="mcloss-gpu-check-") as tmp:
        stage("training", lambda: train_and_resume(device, Path(tmp), args.smoke))
    stage("app_latency", lambda: app_latency(device, 3 if args.smoke else 20, args.smoke))
    with tempfile.TemporaryDirectory(prefix="mcloss-gpu-check-") as tmp:
        stage("steady_export", lambda: steady_export(device, Path(tmp), args.smoke, args.export_workers))
    stage("montage_encoding", lambda: montage_encoding(device, 1 if args.smoke else 10, args.smoke))
    stage("explain_overhead", lambda: explain_host(device, args.smoke))
    stage("writer_scaling", lambda: writer_scaling(args.smoke))
    summary = {name: report[name] for name in STAGES if name in report}
    if "bench" in summary:
        summary["bench"] = [{k: r[k] for k in ("backbone", "precision", "images_per_s")} for r in report["bench"]]
    if "training" in summary:
        summary["training"] = {"ok": report["training"]["ok"]}
    print(json.dumps({"device": report["device"]["name"], **summary}, indent=1))
    return 0 if report.get("training", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
