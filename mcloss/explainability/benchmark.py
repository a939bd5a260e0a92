"""``mcloss bench``: throughput of the explainability paths, as ratios measured in one run.

Same model, batch and device for every path; warm-up, then the median of repeats (taken round-robin
over the paths); images/s. Paths:
``forward_only`` (model forward under inference_mode), ``channel_maps`` (F slices + peaks for the
predicted class), ``channel_maps_and_gradcam`` (plus fused Grad-CAM), ``contrastive`` (plus Finer-CAM and the
group contrast against the nearest class, ``contrast="auto"``, from the same pass), ``captum_gradcam`` (a prediction
forward, then Captum ``LayerGradCam.attribute`` for the predicted class), ``pytorch_grad_cam``
(``GradCAM(model, [model.feature_layer])(x)``), ``atlas`` (F and a running top-16 of every channel on the
device, the pass of :func:`mcloss.explainability.atlas.build_atlas`) and ``export_end_to_end`` (:func:`mcloss.explainability.export.export`
itself: ``export_batches`` batches of JPEGs of synthetic birds, decoded, explained, drawn and written as
PNG/NPZ/JSON to a temp dir, with the export's own overlap of model and writing (lanes on a CPU, writer threads
beside the model on a GPU); random pixels would make the PNG encoder, not the export, the subject),
``export_jpg`` and ``export_webp`` (the same export with JPEG or WebP montages at the default quality) and
``export_no_montage`` (the same export with ``--no-montage``: npz and json only). Precision ``auto`` is bf16 autocast (with
channels-last weights) on CUDA and fp32 on a CPU; ``fp32`` and ``bf16`` force one. Every path runs the backbone on
channels-last batches, as every mcloss command does (:meth:`mcloss.core.model.MCModel.forward_features`). On CUDA clocks are read after a synchronize.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mcloss.core.device import autocast
from mcloss.core.errors import ParameterError
from mcloss.data.io import encode_image
from mcloss.explainability.render.layout import DEFAULT_TILE_HEIGHT

if TYPE_CHECKING:
    from mcloss.core.model import MCModel

__all__ = ["PATHS", "GOALS", "PRECISIONS", "time_path", "run_benchmark", "format_table"]

PATHS = (
    "forward_only",
    "channel_maps",
    "channel_maps_and_gradcam",
    "contrastive",
    "captum_gradcam",
    "pytorch_grad_cam",
    "export_end_to_end",
    "export_jpg",
    "export_webp",
    "export_no_montage",
    "atlas",
)
#: (name, numerator, denominator, goal)
GOALS = (
    ("channel_maps / forward_only", "channel_maps", "forward_only", 0.9),
    ("contrastive / channel_maps_and_gradcam", "contrastive", "channel_maps_and_gradcam", 0.9),
    ("channel_maps_and_gradcam / captum_gradcam", "channel_maps_and_gradcam", "captum_gradcam", 1.5),
    ("channel_maps_and_gradcam / pytorch_grad_cam", "channel_maps_and_gradcam", "pytorch_grad_cam", 2.0),
    ("export_end_to_end / forward_only", "export_end_to_end", "forward_only", 0.7),
    ("export_jpg / forward_only", "export_jpg", "forward_only", 0.7),
    ("export_no_montage / forward_only", "export_no_montage", "forward_only", 0.8),
    ("atlas / forward_only", "atlas", "forward_only", 0.8),
)
PRECISIONS = ("auto", "fp32", "bf16")
#: the paths that run the export over the JPEGs
EXPORTS = {"export_end_to_end", "export_jpg", "export_webp", "export_no_montage"}


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


def _paths(
    model, x: torch.Tensor, device: torch.device, jpegs: Sequence[Path], tile_height: int, amp: bool, workers: int,
    scratch: Path,
) -> dict:
    """The timed callables; the export path writes each call's outputs to a new folder in ``scratch``, removed
    after the timing (deleting outputs is not part of an export)."""
    from captum.attr import LayerGradCam

    from mcloss.explainability.explanation import explain_tensor
    from mcloss.explainability.export import ExportConfig, export
    from mcloss.explainability.render import Style

    geos = [model.transform.geometry(x.shape[3], x.shape[2])] * x.shape[0]

    def forward_only():
        with torch.inference_mode(), autocast(device, enabled=amp):
            return model(x)

    def channel_maps():
        return explain_tensor(model, x, geos, "pred", maps=("channels",), device=device, amp=amp)

    def channel_maps_and_gradcam():
        return explain_tensor(
            model, x, geos, "pred", maps=("channels", "gradcam"), method="fused", device=device, amp=amp
        )

    def contrastive():
        return explain_tensor(
            model, x, geos, "pred", maps=("channels", "gradcam", "finer", "contrast"), method="fused", device=device,
            amp=amp, contrast="auto",
        )  # fmt: skip

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

        # always fp32: pytorch-grad-cam reads the logits and activations into numpy, which has no bfloat16
        with GradCAM(model, [model.feature_layer]) as cam:
            return cam(x, targets=None)  # None: the predicted class

    folder = str(jpegs[0].parent)
    ids = torch.arange(x.shape[0], device=device)
    empty = torch.empty(model.num_channels, 0, device=device)

    def atlas():  # the atlas pass: F, then the running top-16 of every channel, on the device
        from mcloss.explainability.atlas import running_topk

        with torch.inference_mode(), autocast(device, enabled=amp):
            f = model.forward_features(x)
            return running_topk((empty.float(), empty.long(), empty.long()), f.float(), ids, 16)

    def exporting(montage: bool, montage_format: str = "png") -> Callable[[], object]:
        def run():
            config = ExportConfig(
                checkpoint="benchmark", input=[folder], out=tempfile.mkdtemp(dir=scratch),
                style=Style(tile_height=tile_height), batch_size=x.shape[0], workers=workers, device=str(device),
                montage=montage, montage_format=montage_format,
            )  # fmt: skip
            result = export(model, config, device=device, amp=amp, checkpoint_sha256="benchmark")
            if result.written != len(jpegs):  # a timing of a failing export would flatter it
                raise RuntimeError(f"the benchmark export wrote {result.written} of {len(jpegs)} images: {result.errors[:1]}")
            return result

        return run

    return {
        "forward_only": forward_only,
        "channel_maps": channel_maps,
        "channel_maps_and_gradcam": channel_maps_and_gradcam,
        "contrastive": contrastive,
        "captum_gradcam": captum_gradcam,
        "pytorch_grad_cam": pytorch_grad_cam,
        "export_end_to_end": exporting(montage=True),
        "export_jpg": exporting(montage=True, montage_format="jpg"),
        "export_webp": exporting(montage=True, montage_format="webp"),
        "export_no_montage": exporting(montage=False),
        "atlas": atlas,
    }


def run_benchmark(
    model: MCModel,
    device: torch.device,
    *,
    batch_size: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    paths: Sequence[str] = PATHS,
    tile_height: int = DEFAULT_TILE_HEIGHT,
    seed: int = 0,
    precision: str = "auto",
    workers: int = 0,
    export_batches: int = 4,
) -> dict:
    """Time each path on one random batch (the export on ``export_batches`` of them); returns images/s, raw
    times and the goal ratios.

    ``precision``: one of :data:`PRECISIONS`; ``workers``: the export path's decoding workers.
    """
    if export_batches < 1:
        raise ParameterError(f"export_batches must be >= 1, got {export_batches}", parameter="export_batches")
    if precision not in PRECISIONS:
        raise ParameterError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", parameter="precision")
    if precision == "bf16" and device.type != "cuda":  # explain and export autocast on CUDA only: it would run fp32
        raise ParameterError(f"bf16 runs on CUDA only; on {device.type} the paths run fp32", parameter="precision")
    amp = device.type == "cuda" if precision == "auto" else precision == "bf16"
    channels_last = amp  # amp is on only on CUDA: bf16 elsewhere is refused above
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = model.transform.input_size or (model.config["img_size"],) * 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *size, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results: dict[str, dict] = {}
    with (
        tempfile.TemporaryDirectory(prefix="mcloss-bench-in-") as tmp,
        tempfile.TemporaryDirectory(prefix="mcloss-bench-out-") as scratch,
    ):
        count = batch_size * export_batches if EXPORTS & set(paths) else 1
        jpegs = _bird_jpegs(Path(tmp), count, max(size) * 3 // 2, seed)
        fns = _paths(model, x, device, jpegs, tile_height, amp, workers, Path(scratch))
        for name in paths:
            time_path(fns[name], device, warmup=warmup, repeats=0)
        # round-robin repeats, so a change in machine load hits every path alike
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name in paths:
                times[name] += time_path(fns[name], device, warmup=0, repeats=1)
        for name in paths:
            med = statistics.median(times[name])
            images = len(jpegs) if name in EXPORTS else batch_size
            results[name] = {"images_per_s": images / med, "median_s": med, "images": images, "times_s": times[name]}
    ratios = {}
    for label, num, den, goal in GOALS:
        if num in results and den in results:
            r = results[num]["images_per_s"] / results[den]["images_per_s"]
            ratios[label] = {"ratio": r, "goal": goal, "met": r >= goal}
    return {"paths": results, "ratios": ratios, "precision": "bf16" if amp else "fp32", "channels_last": channels_last}


def _bird_jpegs(folder: Path, count: int, side: int, seed: int) -> list[Path]:
    """``count`` JPEGs of synthetic birds (:mod:`mcloss.data.synth`), ``side`` × ``side``, in ``folder``."""
    from mcloss.data.synth import class_definitions, instance_rng, render_bird

    birds = class_definitions(12, "varied")
    paths = []
    for i in range(count):
        path = folder / f"bird{i:03d}.jpg"
        path.write_bytes(encode_image(render_bird(birds[i % len(birds)], side, instance_rng(seed, i), 1.6).image, "jpeg", quality=90))
        paths.append(path)
    return paths


def format_table(report: dict) -> str:
    """A plain-text table of images/s and the goal ratios."""
    lines = [f"{'path':<28} {'images/s':>10} {'median ms':>10} {'images':>7}"]
    for name, r in report["paths"].items():
        lines.append(f"{name:<28} {r['images_per_s']:>10.2f} {r['median_s'] * 1000:>10.1f} {r['images']:>7}")
    lines.append("")
    for label, r in report["ratios"].items():
        lines.append(f"{label:<46} {r['ratio']:>6.2f}x  (goal >= {r['goal']}x: {'met' if r['met'] else 'NOT met'})")
    return "\n".join(lines)
