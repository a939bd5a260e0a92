"""Which channel groups Grad-CAM of the FC head draws on: the true class's own, those of classes that share a
defining part with it, or the rest.

Grad-CAM of class c is ReLU(Σ_k α_k F_k), with α_k the spatial mean of ∂y_c/∂F_k (the official FC head is an
MLP over max-pooled F, so α depends on the image). For each image of a CUB-layout dataset, with its true
class c, the channels are split by group: c's own group, the groups of the other classes that change at least
one of c's defining parts (the dataset's, else the card's, as ``mcloss parts`` reads them), and the remaining
groups. Reported per checkpoint, averaged over the images: each kind's share of the positive α
(``positive_share``), beside its share of the channels (``channel_share``: what the positive share would be if
Grad-CAM preferred no group). Where the dataset has part masks, also the defining-part mass ratio (geometric
mean over the images, as ``mcloss parts`` computes it) of Grad-CAM, of CCMP, and of Grad-CAM built from one
kind of group alone, ReLU(Σ_{k of that kind} α_k F_k) (``mass_ratio``).

    python scripts/gradcam_groups.py --data runs/data/birds12-fresh checkpoints/default.safetensors ...

Used in docs/ablation_discussion.md to explain why CCMP ties with Grad-CAM of the FC head.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch

from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.files import atomic_write_json
from mcloss.core.model import MCModel
from mcloss.data.cub import CUBDataset
from mcloss.data.io import load_image
from mcloss.evaluation.parts import resolve_defining
from mcloss.explainability.defining import crop_regions
from mcloss.explainability.geometry import to_original
from mcloss.metrics import mass

#: the three kinds of group, in report order
KINDS = ("own", "sharing", "other")


def group_kinds(groups: Sequence[int], defining: Sequence[Sequence[str]], cls: int) -> np.ndarray:
    """[K] the kind (:data:`KINDS`) of each channel's group for class ``cls``; ``defining[g]``: class g's
    defining parts (a class with none shares with nobody)."""
    kinds = []
    for g, size in enumerate(groups):
        shared = g != cls and bool(set(defining[cls]) & set(defining[g]))
        kinds += ["own" if g == cls else "sharing" if shared else "other"] * size
    return np.asarray(kinds)


def positive_shares(alpha: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """Each kind's share of the positive channel weights ``alpha`` [K] (NaN when none is positive)."""
    positive = np.clip(alpha, 0, None)
    total = positive.sum()
    return {k: float(positive[kinds == k].sum() / total) if total > 0 else float("nan") for k in KINDS}


def gradcam_weights(model: MCModel, x: torch.Tensor, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(α [B, K], F [B, K, h, w]): Grad-CAM's channel weights of the FC head for the classes ``labels``, and F."""
    features = model.forward_features(x).detach().requires_grad_(True)
    logits = model.head_logits(features)
    picked = logits[torch.arange(len(labels)), torch.as_tensor(list(labels))]
    (grad,) = torch.autograd.grad(picked.sum(), features)
    return grad.mean(dim=(2, 3)).cpu().numpy(), features.detach().cpu().numpy()


#: the maps whose mass ratios are reported: Grad-CAM, CCMP, and Grad-CAM from one kind of group alone
MAPS = ("gradcam", "ccmp", *(f"gradcam_{k}" for k in KINDS))


def _maps(alpha: np.ndarray, features: np.ndarray, kinds: np.ndarray, own: slice) -> dict[str, np.ndarray]:
    out = {"gradcam": np.maximum(np.tensordot(alpha, features, axes=1), 0)}
    out["ccmp"] = features[own].max(axis=0)  # the group's cross-channel max
    for k in KINDS:
        on = kinds == k
        out[f"gradcam_{k}"] = np.maximum(np.tensordot(alpha[on], features[on], axes=1), 0)
    return out


def group_report(checkpoint: str, data: str, limit: int | None = None, batch: int = 16) -> dict:
    """The mean over the images of each kind's positive share and channel share, and the maps' mass ratios."""
    model = load_checkpoint(checkpoint).eval()
    dataset = CUBDataset(data, "test")
    by_label, names, source = resolve_defining(dataset, model, dataset.part_names)
    if source is None:
        raise SystemExit(f"{checkpoint}: no defining parts, neither in {data} nor in the checkpoint's card")
    defining = [names.get(n, []) for n in model.class_names]
    records = dataset.records[:limit]
    shares: dict[str, list[float]] = {k: [] for k in KINDS}
    channels: dict[str, list[float]] = {k: [] for k in KINDS}
    ratios: dict[str, list[float]] = {m: [] for m in MAPS}
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        images = [load_image(r.path) for r in chunk]
        x = torch.stack([model.transform(im) for im in images])
        alphas, features = gradcam_weights(model, x, [r.label for r in chunk])
        for r, image, alpha, f in zip(chunk, images, alphas, features, strict=True):
            kinds = group_kinds(model.groups, defining, r.label)
            for k, v in positive_shares(alpha, kinds).items():
                shares[k].append(v)
                channels[k].append(float(np.mean(kinds == k)))
            labels = dataset.part_labels(r)
            indices = by_label[r.label]
            if labels is None or not indices:
                continue
            geometry = model.transform.geometry(*image.size)
            regions = crop_regions(labels, None, geometry, 0.0)
            for name, m in _maps(alpha, f, kinds, model.group_slice(r.label)).items():
                ratios[name].append(mass.mass_ratio(to_original(m, geometry), regions, indices, len(dataset.part_names)))
    return {
        "checkpoint": checkpoint,
        "images": len(records),
        "positive_share": {k: float(np.nanmean(v)) for k, v in shares.items()},
        "channel_share": {k: float(np.mean(v)) for k, v in channels.items()},
        "mass_ratio": {m: mass.geometric_mean(v) for m, v in ratios.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", required=True, help="CUB-layout dataset (its test split)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    rows = [group_report(path, args.data, args.limit) for path in args.checkpoints]
    print("| checkpoint | images | positive α on own / sharing / other groups | their share of the channels "
          "| mass ratio: " + " / ".join(MAPS) + " |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [" / ".join(f"{r[key][k]:.2f}" for k in KINDS) for key in ("positive_share", "channel_share")]
        cells.append(" / ".join(f"{r['mass_ratio'][m]:.2f}" for m in MAPS))
        print(f"| {r['checkpoint']} | {r['images']} | " + " | ".join(cells) + " |")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
