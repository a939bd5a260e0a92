"""Training-cost benchmark: MC-Loss vs CE-only train steps, and our loss vs the official op sequence.

(a) One SGD train step (forward + backward + step) of the same model on the same batch with
    MC-Loss, with CE only, and with our ``--loss ce`` path (MCLoss with α = β = 0, which still
    measures the MC terms for the logs). Goal: MC-Loss overhead <= 5%.
(b) ``mutual_channel_loss`` (forward + backward) against a transcription of the official op sequence
    (channels moved last, ``F.max_pool2d`` with kernel (1, ξ) over them, for the masked-GAP logits and
    the softmax branch; equal groups), on the same features and mask; their values and gradients are
    compared.

(c) The MC-Loss train step (AdamW, as the embedded default trains) in the layouts and precisions
    ``mcloss train`` can use on a CPU: fp32 contiguous, fp32 channels_last (what it does now), and
    channels_last with bf16 autocast (``--cpu-bf16``). The bf16 row is skipped where the CPU has no
    native bf16 (it would only measure the emulation).

Usage: python benchmarks/bench_train.py [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mcloss.core.device import autocast, cpu_has_native_bf16
from mcloss.core.loss import MCLoss, draw_channel_mask, mutual_channel_loss
from mcloss.core.model import build_model

__all__ = ["official_mc_loss", "time_median", "main"]


def official_mc_loss(features: torch.Tensor, targets: torch.Tensor, xi: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training script's MC-Loss op sequence for equal groups of ``xi`` channels.

    Cross-channel pooling moves channels to the last axis (transpose of dims 1 and 3) and runs
    ``F.max_pool2d`` with kernel and stride (1, ξ) over (H, K), then moves them back.
    Returns ``(loss_1, loss_2)`` = (L_dis, L_div term).
    """

    def channel_max(x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(3, 1)  # [B, W, H, K]
        x = F.max_pool2d(x, kernel_size=(1, xi), stride=(1, xi))  # [B, W, H, C]
        return x.transpose(3, 1)  # [B, C, H, W]

    b, k, h, w = features.shape
    classes = k // xi
    branch = torch.softmax(features.reshape(b, k, h * w), 2).reshape(b, k, h, w)
    branch = channel_max(branch).reshape(b, classes, h * w)
    loss_2 = 1.0 - torch.mean(torch.sum(branch, 2)) / xi
    branch_1 = channel_max(features * mask.view(1, k, 1, 1))
    branch_1 = F.avg_pool2d(branch_1, kernel_size=(h, w)).view(b, -1)
    loss_1 = F.cross_entropy(branch_1, targets)
    return loss_1, loss_2


def time_median(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per call of each function.

    Calls are interleaved so that load drifts hit every variant alike; the process CPU time is the
    steadier number on a machine shared with other jobs (it does not count time spent descheduled).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def bench_train_step(classes: int, xi: int, size: int, batch: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median train-step seconds: MC-Loss, CE only, and MCLoss(α=β=0) on one resnet18 and batch."""
    torch.manual_seed(0)
    model = build_model("resnet18", classes, xi=xi, img_size=size).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, size, size)
    targets = torch.randint(0, classes, (batch,))
    mc_loss = MCLoss(model.groups, 1.5, 20.0)
    zero_loss = MCLoss(model.groups, 0.0, 0.0)

    def step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        features = model.forward_features(images)
        logits = model.head_logits(features)
        loss = loss_fn(logits, features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return time_median(
        {
            "MC-Loss (α=1.5, β=20)": lambda: step(lambda lg, ft: mc_loss(lg, ft, targets).total),
            "CE only": lambda: step(lambda lg, ft: F.cross_entropy(lg, targets)),
            "--loss ce (MC terms logged)": lambda: step(lambda lg, ft: zero_loss(lg, ft, targets).total),
        },
        repeats,
    )


def bench_step_precision(classes: int, size: int, batch: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median MC-Loss train-step seconds per CPU memory layout and precision, on one resnet18 and batch."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    targets = torch.randint(0, classes, (batch,))
    variants = {"fp32, contiguous": (False, False), "fp32, channels_last": (True, False)}
    if cpu_has_native_bf16():
        variants["bf16 autocast, channels_last (--cpu-bf16)"] = (True, True)
    steps = {}
    for name, (channels_last, bf16) in variants.items():
        torch.manual_seed(0)
        model = build_model("resnet18", classes, xi=3, img_size=size).train()
        x = images
        if channels_last:
            model.to(memory_format=torch.channels_last)
            x = images.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        loss = MCLoss(model.groups, 1.5, 20.0)

        def step(model=model, x=x, optimizer=optimizer, loss=loss, bf16=bf16) -> None:
            with autocast(cpu, bf16, cpu=True):
                features = model.forward_features(x)
                logits = model.head_logits(features)
            total = loss(logits.float(), features, targets).total
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

        steps[name] = step
    return time_median(steps, repeats)


def bench_loss(
    batch: int, classes: int, xi: int, hw: int, repeats: int
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Median forward+backward seconds of ours vs the official sequence, and their largest differences."""
    torch.manual_seed(0)
    k = classes * xi
    # Strictly positive (post-ReLU-like, without exact zeros) so that channel maxima have no ties and the
    # two implementations' max gradients are comparable element by element.
    base = torch.rand(batch, k, hw, hw) * 4.0 + 1e-3
    targets = torch.randint(0, classes, (batch,))
    mask = draw_channel_mask(xi, k)

    def run(fn: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = base.clone().requires_grad_(True)
        dis, div = fn(feats)
        (1.5 * dis + 20.0 * div).backward()
        return dis.detach(), div.detach(), feats.grad

    ours = lambda f: mutual_channel_loss(f, targets, xi, mask=mask)  # noqa: E731
    theirs = lambda f: official_mc_loss(f, targets, xi, mask)  # noqa: E731
    a, b = run(ours), run(theirs)
    diffs = {
        "L_dis": abs(a[0] - b[0]).item(),
        "L_div": abs(a[1] - b[1]).item(),
        "grad": (a[2] - b[2]).abs().max().item(),
        "grad_scale": b[2].abs().max().item(),
    }
    times = time_median({"mutual_channel_loss (ours)": lambda: run(ours), "official op sequence": lambda: run(theirs)}, repeats)
    return times, diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median reported)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), CPU float32, median of {args.repeats} (interleaved, 2 warm-up)")  # fmt: skip

    print("\n(a) train step, resnet18 ξ=3, 30 classes (K=90, F 14×14), 224 px, batch 16")
    steps = bench_train_step(classes=30, xi=3, size=224, batch=16, repeats=args.repeats)
    ce_wall, ce_cpu = steps["CE only"]
    print(f"{'variant':<30} {'wall s':>8} {'vs CE':>7} {'CPU s':>8} {'vs CE':>7}")
    for name, (wall, cpu) in steps.items():
        print(f"{name:<30} {wall:>8.3f} {wall / ce_wall:>7.3f} {cpu:>8.3f} {cpu / ce_cpu:>7.3f}")
    mc_wall, mc_cpu = steps["MC-Loss (α=1.5, β=20)"]
    for label, overhead in (("wall", mc_wall / ce_wall - 1.0), ("CPU", mc_cpu / ce_cpu - 1.0)):
        print(f"MC-Loss overhead ({label}): {100 * overhead:+.1f}% (goal <= 5%): {'OK' if overhead <= 0.05 else 'ABOVE GOAL'}")

    print("\n(b) loss forward+backward on the same features and mask")
    print(f"{'shape [B, K, H, W]':<20} {'ours ms':>8} {'official ms':>12} {'ratio':>6} {'CPU ratio':>10} "
          f"{'|ΔL_dis|':>9} {'|ΔL_div|':>9} {'max|Δgrad|':>10}")  # fmt: skip
    all_ok = True
    for batch, classes, hw in ((16, 30, 14), (32, 200, 14)):
        times, diffs = bench_loss(batch, classes, 3, hw, args.repeats)
        (ours, ours_cpu), (theirs, theirs_cpu) = times["mutual_channel_loss (ours)"], times["official op sequence"]
        shape = f"[{batch}, {3 * classes}, {hw}, {hw}]"
        print(f"{shape:<20} {1e3 * ours:>8.2f} {1e3 * theirs:>12.2f} {ours / theirs:>6.2f} {ours_cpu / theirs_cpu:>10.2f} "
              f"{diffs['L_dis']:>9.2e} {diffs['L_div']:>9.2e} {diffs['grad']:>10.2e}")  # fmt: skip
        ok = diffs["L_dis"] <= 1e-5 and diffs["L_div"] <= 1e-6 and diffs["grad"] <= 1e-6 * max(1.0, diffs["grad_scale"])
        all_ok &= ok
        if (batch, classes, hw) == (16, 30, 14):  # the features of (a): the loss alone, as a share of a step
            print(f"{'':<20} (this loss alone is {100 * ours_cpu / ce_cpu:.1f}% of the CE-only step's CPU time in (a))")
    print(f"numerical agreement (|ΔL| <= 1e-5, max|Δgrad| <= 1e-6 of scale): {'yes' if all_ok else 'NO'}")

    print("\n(c) MC-Loss train step (AdamW) by memory layout and precision, resnet18 ξ=3, 12 classes, 224 px, batch 32")
    if not cpu_has_native_bf16():
        print("(this CPU has no native bf16: the --cpu-bf16 row is left out)")
    layouts = bench_step_precision(classes=12, size=224, batch=32, repeats=args.repeats)
    base_wall, base_cpu = layouts["fp32, contiguous"]
    print(f"{'variant':<44} {'wall s':>8} {'speed-up':>9} {'CPU s':>8} {'speed-up':>9}")
    for name, (wall, cpu) in layouts.items():
        print(f"{name:<44} {wall:>8.3f} {base_wall / wall:>8.2f}x {cpu:>8.3f} {base_cpu / cpu:>8.2f}x")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
