"""Shared fixtures: tiny seeded models, and a check that no hook is left on a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

import mcloss

#: Every per-module hook registry of torch.nn.Module (forward, backward, pre, with-kwargs, always-called).
HOOK_REGISTRIES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hooks_left(model: torch.nn.Module) -> int:
    """How many hooks are registered on ``model`` and its submodules."""
    return sum(len(getattr(m, name, {}) or {}) for m in model.modules() for name in HOOK_REGISTRIES)


def tiny_model(
    classes: int = 4,
    *,
    xi: int = 3,
    img_size: int = 64,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    **kwargs,
) -> mcloss.MCModel:
    """A randomly initialized (seeded) ResNet-18 MCModel in eval mode: fast enough for any unit test."""
    torch.manual_seed(seed)
    return mcloss.build_model("resnet18", classes, xi=xi, img_size=img_size, class_names=class_names, **kwargs).eval()


@pytest.fixture
def make_model() -> Callable[..., mcloss.MCModel]:
    """The :func:`tiny_model` factory (a fresh model per call, so tests may change it)."""
    return tiny_model


@pytest.fixture
def random_images() -> Callable[..., list[Image.Image]]:
    """``random_images(n, w=64, h=64, seed=None)``: n seeded random RGB images."""

    def make(n: int, w: int = 64, h: int = 64, seed: int | None = None) -> list[Image.Image]:
        rng = np.random.default_rng(n if seed is None else seed)
        return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]

    return make


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Callable[..., object]:
    """``tiny_checkpoint(classes=2, class_names=None, img_size=32)``: save a tiny model; returns its path."""

    def save(classes: int = 2, class_names: Sequence[str] | None = None, img_size: int = 32):
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(classes)]
        path = tmp_path / f"tiny-{classes}-{img_size}.safetensors"
        mcloss.save_checkpoint(tiny_model(classes, class_names=names, img_size=img_size), path)
        return path

    return save
