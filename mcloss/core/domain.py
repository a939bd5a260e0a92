"""Is an image inside what the model knows? A domain score from F, in the prediction's own forward pass.

The score is a deep k-nearest-neighbour distance (after Sun et al., ICML 2022) on a summary of F: each
channel pooled by the mean of its top ``pool_share`` positions, ``log1p``-compressed and scaled to unit
length. An image's score is the cosine distance to the ``k``-th nearest of a bank of such vectors from the
model's training images; the higher, the farther from anything the model was trained on. The threshold is
the ``quantile`` (95 %) of the scores of held-out in-domain images, so that that share of them passes.

A :class:`DomainCheck` is a submodule of the model (``model.domain``): the bank is a buffer saved with the
weights (covered by the checkpoint's weights digest), and ``model.config["domain"]`` holds ``k``,
``pool_share``, the threshold and how it was calibrated. A model without one (an imported checkpoint, or one
saved before) has ``model.domain is None``: its domain check is unavailable.

How the statistics are made: :func:`mcloss.evaluation.domain.fit_domain`; how they were chosen and what
they achieve: ``docs/domain.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mcloss.core.errors import ParameterError
from mcloss.core.loss import top_share_mean

__all__ = ["DOMAIN_K", "DOMAIN_POOL_SHARE", "DOMAIN_QUANTILE", "DomainCheck", "DomainVerdict", "domain_features"]

#: Defaults: the k-th neighbour, the pooled share of each channel's positions, the share of held-out in-domain
#: images that pass.
DOMAIN_K = 50
DOMAIN_POOL_SHARE = 0.07
DOMAIN_QUANTILE = 0.95


def domain_features(features: torch.Tensor, pool_share: float = DOMAIN_POOL_SHARE) -> torch.Tensor:
    """[B, K] unit vectors from F [B, K, h, w]: each channel's top-``pool_share`` mean, ``log1p``, over its norm."""
    pooled = top_share_mean(features.float().flatten(2), pool_share).clamp_min(0)
    return nn.functional.normalize(torch.log1p(pooled), dim=1)


@dataclass(frozen=True)
class DomainVerdict:
    """One image's domain check.

    Attributes:
        score: the cosine distance to the k-th nearest training vector (higher: farther).
        threshold: the calibrated threshold (``quantile`` of held-out in-domain scores).
    """

    score: float
    threshold: float

    @property
    def in_domain(self) -> bool:
        """The score is at most the threshold."""
        return self.score <= self.threshold

    def record(self) -> dict:
        """``{"score", "threshold", "in_domain"}`` for json."""
        return {"score": self.score, "threshold": self.threshold, "in_domain": self.in_domain}


class DomainCheck(nn.Module):
    """The bank of training vectors and the calibrated threshold (see the module docstring).

    Args:
        bank: [N, K] unit vectors (:func:`domain_features` of training images).
        threshold: the score at or below which an image counts as in the domain.
        k: the neighbour whose distance is the score (at most N).
        pool_share: the pool of :func:`domain_features`.
        calibration: how the threshold was set (kept in the config, e.g. the quantile and the image count).
    """

    def __init__(
        self,
        bank: torch.Tensor,
        threshold: float,
        *,
        k: int = DOMAIN_K,
        pool_share: float = DOMAIN_POOL_SHARE,
        calibration: dict | None = None,
    ) -> None:
        super().__init__()
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ParameterError(f"domain bank must be [N, K] with N >= 1, got {tuple(bank.shape)}", parameter="bank")
        if not 1 <= int(k) <= bank.shape[0]:
            raise ParameterError(f"k must be in [1, {bank.shape[0]}], got {k}", parameter="k")
        if not 0 < pool_share <= 1:
            raise ParameterError(f"pool_share must be in (0, 1], got {pool_share}", parameter="pool_share")
        self.register_buffer("bank", bank.float().contiguous())
        self.threshold = float(threshold)
        self.k = int(k)
        self.pool_share = float(pool_share)
        self.calibration = dict(calibration or {})

    def config(self) -> dict:
        """What rebuilds it around a bank of the same shape (``model.config["domain"]``)."""
        return {
            "bank": list(self.bank.shape), "k": self.k, "pool_share": self.pool_share, "threshold": self.threshold,
            "calibration": self.calibration,
        }  # fmt: skip

    @classmethod
    def from_config(cls, config: dict, channels: int) -> DomainCheck:
        """An empty check (zero bank) of the configured shape, to load a state dict into.

        Raises:
            ParameterError: a config that does not describe a check for ``channels`` channels.
        """
        try:
            n, width = (int(v) for v in config["bank"])
            threshold, k, share = float(config["threshold"]), int(config["k"]), float(config["pool_share"])
        except (KeyError, TypeError, ValueError):
            raise ParameterError("domain: config must hold bank [N, K], k, pool_share and threshold") from None
        if width != channels:
            raise ParameterError(f"domain: bank of {width}-channel vectors for a model with {channels} channels")
        if not 1 <= n <= 1_000_000:
            raise ParameterError(f"domain: bank of {n} vectors is out of range")
        return cls(torch.zeros(n, width), threshold, k=k, pool_share=share, calibration=config.get("calibration"))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B] the score of each image from its F [B, K, h, w] (no gradient)."""
        return self.vector_scores(domain_features(features.detach(), self.pool_share))

    def vector_scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N] the score of each domain vector [N, K] (:func:`domain_features`): the cosine distance to its
        ``k``-th nearest bank vector."""
        with torch.no_grad():
            distance = 1.0 - vectors.to(self.bank.device) @ self.bank.T
            return distance.topk(self.k, dim=1, largest=False).values[:, -1]

    def verdicts(self, features: torch.Tensor) -> list[DomainVerdict]:
        """One :class:`DomainVerdict` per image of F."""
        return [DomainVerdict(float(s), self.threshold) for s in self.scores(features).cpu().tolist()]
