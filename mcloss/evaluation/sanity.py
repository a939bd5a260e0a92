"""Sanity checks of the explanations: do the maps depend on the model, and does the FC head use the class's
own channel group?

- **Cascading model-parameter randomization** (Adebayo et al., 2018): re-initialize the model's blocks from
  the top down (the FC head first, then the trunk's blocks from the last one), cumulatively, and compare the
  true class's maps with the trained model's: Spearman rank correlation and SSIM, per map kind (each channel
  of the class's group, its CCMP map, Grad-CAM of the FC head). Maps that survive randomization do not
  explain the model. The channel maps read F directly, so they cannot change while only the head is random;
  Grad-CAM can.
- **Group knockout**: zero class c's ξ_c channels of F and measure how far c's FC-head and MC-head logits
  drop, against zeroing ξ_c random channels of other classes (``draws`` draws per image). The MC head is
  c's group pooled (CCMP, then the model's ``mc_pool_share``), so it depends on that group by construction; the official FC head mixes every
  channel, and this says whether it relies on c's own.
- **Random logit**: how similar class c's maps are to another (random) class's maps on the same image.

Everything here is pure: tensors in, numbers out (:func:`run_sanity`); ``mcloss sanity`` writes the files.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from mcloss.core.errors import ParameterError
from mcloss.core.model import MCModel, model_guard
from mcloss.explainability.gradcam import fused_gradcam, gradcam_from_weights

__all__ = [
    "SANITY_MAPS",
    "SIMILARITY_PASS",
    "cascade_steps",
    "cascading_randomization",
    "class_maps",
    "group_knockout",
    "knockout_verdict",
    "MIN_VERDICT_IMAGES",
    "random_logit",
    "rank_correlation",
    "run_sanity",
    "ssim",
]

#: The map kinds compared.
SANITY_MAPS = ("channels", "ccmp", "gradcam")
#: A check of "the maps changed" passes when the mean Spearman correlation is below this.
SIMILARITY_PASS = 0.5


# ------------------------------------------------------------------------------------------- similarity


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened); 0 when exactly one is constant, NaN when both are."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.size != y.size:
        raise ParameterError(f"maps of {x.size} and {y.size} values")
    flat_x, flat_y = np.ptp(x) == 0, np.ptp(y) == 0
    if flat_x and flat_y:
        return float("nan")
    if flat_x or flat_y:  # one map lost (or gained) all structure: no rank agreement left
        return 0.0
    return float(spearmanr(x, y).statistic)


def _unit(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    lo, hi = float(m.min()), float(m.max())
    return np.zeros_like(m) if hi <= lo else (m - lo) / (hi - lo)


def ssim(a: np.ndarray, b: np.ndarray, *, sigma: float = 1.5) -> float:
    """Mean structural similarity of two 2-D maps, each rescaled to [0, 1] first (Gaussian window of
    ``sigma`` cells, the usual constants for a data range of 1)."""
    x, y = _unit(a), _unit(b)
    if x.shape != y.shape or x.ndim != 2:
        raise ParameterError(f"SSIM needs two maps of one 2-D shape, got {x.shape} and {y.shape}")
    c1, c2 = 0.01**2, 0.03**2

    def blur(m: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


# ------------------------------------------------------------------------------------------- maps


def class_maps(model: MCModel, x: torch.Tensor, targets: Sequence[int]) -> dict[str, np.ndarray]:
    """For each image, its target's channel maps (a list of [ξ_c, h, w]: groups may differ in size), CCMP
    [B, h, w] and ReLU Grad-CAM of the FC head [B, h, w] (fused: gradients with respect to F of one pass), at
    feature resolution, float64."""
    with model_guard(model, freeze=True):
        with torch.no_grad():
            feats = model.forward_features(x).float()
        feats = feats.detach().requires_grad_(True)
        logits = model.head_logits(feats).float()
        weights = fused_gradcam(feats, logits, list(targets))
        cam = gradcam_from_weights(feats.detach(), weights)
        f = feats.detach()
        chans = [f[i, model.group_slice(t)].double().cpu().numpy() for i, t in enumerate(targets)]
    return {
        "channels": chans,
        "ccmp": np.stack([c.max(axis=0) for c in chans]),
        "gradcam": cam.double().cpu().numpy(),
    }


def _similarities(ref: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Per map kind, per image: Spearman and SSIM between ``ref`` and ``other`` (channels: channel i with
    channel i, up to the smaller group, and the mean over them)."""
    out: dict[str, dict[str, list[float]]] = {}
    for kind in SANITY_MAPS:
        rho, sim = [], []
        for a, b in zip(ref[kind], other[kind], strict=True):
            pairs = list(zip(a, b, strict=False)) if kind == "channels" else [(a, b)]
            rho.append(_stats([rank_correlation(p, q) for p, q in pairs])["mean"])  # NaN when none is finite
            sim.append(float(np.mean([ssim(p, q) for p, q in pairs])))
        out[kind] = {"spearman": rho, "ssim": sim}
    return out


# ------------------------------------------------------------------------------------------- cascade


def cascade_steps(model: MCModel) -> list[str]:
    """Qualified names of the blocks re-initialized in turn: the FC head, then the trunk's children with
    parameters from the last one to the first."""
    trunk = [
        f"features.{name}" for name, child in model.feature_layer.named_children() if any(True for _ in child.parameters())
    ]
    return ["head", *reversed(trunk)]


def _reinitialize(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


def cascading_randomization(
    model: MCModel, batches: Sequence[tuple[torch.Tensor, Sequence[int]]], *, seed: int = 0
) -> list[dict]:
    """Similarity of the trained model's maps to those after each cumulative re-initialization step.

    Args:
        model: the trained model (left unchanged; a copy is randomized).
        batches: (normalized inputs [B, 3, H, W], target class per image).
        seed: seeds the re-initialization.

    Returns:
        One row per step (step 0: nothing randomized): ``step``, ``randomized`` (the block of this step),
        and per map kind the per-image Spearman and SSIM lists.
    """
    refs = [class_maps(model, x, t) for x, t in batches]
    steps = cascade_steps(model)
    rows = [{"step": 0, "randomized": "none", **_merge([_similarities(r, r) for r in refs])}]
    rand = copy.deepcopy(model)
    modules = dict(rand.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, name in enumerate(steps, start=1):
            _reinitialize(modules[name])
            maps = [class_maps(rand, x, t) for x, t in batches]
            rows.append({"step": i, "randomized": name, **_merge([_similarities(r, m) for r, m in zip(refs, maps, strict=True)])})
    return rows


def _merge(parts: list[dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, list[float]]]:
    return {k: {m: [v for p in parts for v in p[k][m]] for m in ("spearman", "ssim")} for k in SANITY_MAPS}


# ------------------------------------------------------------------------------------------- knockout


def group_knockout(
    model: MCModel, x: torch.Tensor, targets: Sequence[int], *, draws: int = 5, generator: torch.Generator | None = None
) -> dict[str, np.ndarray]:
    """Logit drops of each image's target when its own group, or ξ random channels of other classes, are zeroed.

    Returns:
        ``fc_own``, ``fc_random``, ``mc_own``, ``mc_random``: [B] drops (trained logit − knocked-out logit;
        random: mean over ``draws``).
    """
    gen = generator or torch.Generator().manual_seed(0)
    b, k = x.shape[0], model.num_channels
    idx = torch.arange(b)
    t = torch.as_tensor(list(targets))
    with model_guard(model, freeze=True), torch.no_grad():
        feats = model.forward_features(x).float()

        def logits(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = feats * mask.to(feats.device)[:, :, None, None]
            return model.head_logits(f).float()[idx, t].cpu(), model.mc_logits(f).float()[idx, t].cpu()

        fc0, mc0 = logits(torch.ones(b, k))
        own = torch.ones(b, k)
        others = []
        for i, c in enumerate(targets):
            s = model.group_slice(c)
            own[i, s] = 0
            others.append(torch.cat([torch.arange(0, s.start), torch.arange(s.stop, k)]))
        fc_own, mc_own = logits(own)
        fc_r, mc_r = torch.zeros(b), torch.zeros(b)
        for _ in range(draws):
            mask = torch.ones(b, k)
            for i, c in enumerate(targets):
                size = model.group_slice(c).stop - model.group_slice(c).start
                pick = others[i][torch.randperm(len(others[i]), generator=gen)[:size]]
                mask[i, pick] = 0
            fc_k, mc_k = logits(mask)
            fc_r += (fc0 - fc_k) / draws
            mc_r += (mc0 - mc_k) / draws
    return {
        "fc_own": (fc0 - fc_own).double().numpy(),
        "fc_random": fc_r.double().numpy(),
        "mc_own": (mc0 - mc_own).double().numpy(),
        "mc_random": mc_r.double().numpy(),
    }


@dataclass(frozen=True)
class KnockoutVerdict:
    """Whether a head depends on the class's own group: the paired own − random drop and its standard error."""

    head: str
    own_mean: float
    own_std: float
    random_mean: float
    random_std: float
    difference: float
    standard_error: float
    depends: bool

    def sentence(self) -> str:
        says = "depends" if self.depends else "does not measurably depend"
        return (
            f"The {self.head} head {says} on the class's own channel group: zeroing it drops the class's logit by "
            f"{self.own_mean:.3g} ± {self.own_std:.3g}, zeroing as many random channels of other classes by "
            f"{self.random_mean:.3g} ± {self.random_std:.3g} (paired difference {self.difference:.3g} ± "
            f"{self.standard_error:.2g} s.e.)."
        )


#: Fewest images from which the checks give a verdict (passed or failed); with fewer they give their numbers only.
MIN_VERDICT_IMAGES = 5


def knockout_verdict(own: np.ndarray, random: np.ndarray, head: str) -> KnockoutVerdict:
    """Depends when the mean paired difference own − random is positive and over twice its standard error."""
    own, random = np.asarray(own, np.float64), np.asarray(random, np.float64)
    diff = own - random
    se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("inf")
    mean = float(diff.mean()) if diff.size else float("nan")
    depends = bool(diff.size > 1 and mean > 0 and mean > 2 * se)
    a, b = _stats(own), _stats(random)
    return KnockoutVerdict(head, a["mean"], a["std"], b["mean"], b["std"], mean, se, depends)


# ------------------------------------------------------------------------------------------- random logit


def random_logit(
    model: MCModel, x: torch.Tensor, targets: Sequence[int], *, generator: torch.Generator | None = None
) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """Another class per image (uniform, never the target) and the similarity of its maps to the target's."""
    gen = generator or torch.Generator().manual_seed(0)
    n = model.num_classes
    if n < 2:
        raise ParameterError("the random-logit check needs at least 2 classes", parameter="model")
    others = [int((t + 1 + torch.randint(n - 1, (1,), generator=gen)) % n) for t in targets]
    return others, _similarities(class_maps(model, x, targets), class_maps(model, x, others))


# ------------------------------------------------------------------------------------------- all of it


def _map_check(check: str, what: str, rho: float, against: str) -> dict:
    """A "the maps differ" check: passed when the mean Spearman is below SIMILARITY_PASS; undefined (not
    passed, and said so) when every pair of maps was constant."""
    if not np.isfinite(rho):
        return {"check": check, "value": None, "passed": False,
                "line": f"{what}: undefined, every map compared with {against} was constant"}  # fmt: skip
    return {"check": check, "value": rho, "passed": bool(rho < SIMILARITY_PASS),
            "line": f"{what}: mean Spearman {rho:.3f} with {against} (passes below {SIMILARITY_PASS})"}  # fmt: skip


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def _knockouts_and_random_logits(
    model: MCModel, batches: Sequence[tuple[torch.Tensor, Sequence[int]]], *, seed: int, draws: int
) -> tuple[dict[str, list[float]], list[int], list[int], dict[str, dict[str, list[float]]]]:
    """Group knockout and random logit over the batches, one random stream for both (seeded by ``seed``):
    (logit drops by key, targets, the other class per image, similarities by map kind and measure)."""
    gen = torch.Generator().manual_seed(seed)
    knock: dict[str, list[float]] = {k: [] for k in ("fc_own", "fc_random", "mc_own", "mc_random")}
    targets: list[int] = []
    random_rows: dict[str, dict[str, list[float]]] = {k: {"spearman": [], "ssim": []} for k in SANITY_MAPS}
    others: list[int] = []
    for x, t in batches:
        drops = group_knockout(model, x, t, draws=draws, generator=gen)
        for key, values in drops.items():
            knock[key] += [float(v) for v in values]
        targets += [int(c) for c in t]
        chosen, sims = random_logit(model, x, t, generator=gen)
        others += chosen
        for kind in SANITY_MAPS:
            for m in ("spearman", "ssim"):
                random_rows[kind][m] += sims[kind][m]
    return knock, targets, others, random_rows


def run_sanity(
    model: MCModel,
    batches: Sequence[tuple[torch.Tensor, Sequence[int]]],
    *,
    seed: int = 0,
    draws: int = 5,
) -> dict:
    """All three checks on the same images; a JSON-friendly summary with per-image values and verdicts.

    Args:
        model: the model (unchanged).
        batches: (normalized inputs, target class per image), e.g. the true classes.
        seed: seeds the re-initialization and the random choices.
        draws: random knockout draws per image.
    """
    cascade = cascading_randomization(model, batches, seed=seed)
    knock, targets, others, random_rows = _knockouts_and_random_logits(model, batches, seed=seed, draws=draws)
    per_class = {}
    for c in sorted(set(targets)):
        rows = [i for i, t in enumerate(targets) if t == c]
        per_class[model.class_names[c]] = {key: _stats([knock[key][i] for i in rows]) for key in knock}
    verdicts = {
        head: knockout_verdict(np.array(knock[f"{head}_own"]), np.array(knock[f"{head}_random"]), label)
        for head, label in (("fc", "FC"), ("mc", "MC"))
    }
    last = cascade[-1]
    checks = [_map_check(f"cascading randomization: {kind}", f"{kind} maps after every block is re-initialized",
                         _stats(last[kind]["spearman"])["mean"], "the trained model's") for kind in SANITY_MAPS]  # fmt: skip
    checks += [
        {"check": f"group knockout: {v.head} head", "value": v.difference, "passed": v.depends, "line": v.sentence()}
        for v in verdicts.values()
    ]
    checks.append(_map_check("random logit: ccmp", "CCMP map of the class", _stats(random_rows["ccmp"]["spearman"])["mean"],
                             "another class's on the same image"))  # fmt: skip
    if len(targets) < MIN_VERDICT_IMAGES:  # numbers still shown; no pass or fail from so few images
        for c in checks:
            c["passed"] = None
            c["line"] = f"too few images for a verdict ({len(targets)} of the {MIN_VERDICT_IMAGES} it needs); {c['line']}"
    return {
        "images": len(targets),
        "steps": [row["randomized"] for row in cascade],
        "cascade": [
            {"step": r["step"], "randomized": r["randomized"],
             **{f"{k}_{m}": _stats(r[k][m]) for k in SANITY_MAPS for m in ("spearman", "ssim")}}
            for r in cascade
        ],  # fmt: skip
        "cascade_per_image": cascade,
        "knockout": {"per_image": knock | {"target": targets}, "per_class": per_class,
                     "overall": {key: _stats(v) for key, v in knock.items()},
                     "verdicts": {h: v.__dict__ | {"sentence": v.sentence()} for h, v in verdicts.items()}},  # fmt: skip
        "random_logit": {"other": others, **{f"{k}_{m}": _stats(random_rows[k][m]) for k in SANITY_MAPS for m in ("spearman", "ssim")},
                         "per_image": random_rows},  # fmt: skip
        "checks": checks,
    }
