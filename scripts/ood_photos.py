"""A set of real photographs for the out-of-domain check, from the sample images that scientific Python packages
ship (scikit-image, scikit-learn, Matplotlib): each photo whole, mirrored, and in random crops.

    python scripts/ood_photos.py --out runs/data/photos-ood

Used by docs/domain.md to measure the AUROC of the domain score of fresh synthetic birds against real photos.
Crops of one photo are not independent images: the AUROC's interval is computed over the source photos too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: scikit-image samples that ship with the package (no download), RGB or grey.
SKIMAGE = ("astronaut", "camera", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
           "brick", "grass", "gravel", "moon", "coins", "clock", "cell", "page", "text", "colorwheel")  # fmt: skip


def sample_photos() -> Iterator[tuple[str, np.ndarray]]:
    """(name, RGB uint8) of every sample photo available here."""
    import skimage.data

    for name in SKIMAGE:
        image = getattr(skimage.data, name)()
        yield name, _rgb(image)
    stereo = skimage.data.stereo_motorcycle()
    yield "motorcycle_left", _rgb(stereo[0])
    try:
        from sklearn.datasets import load_sample_images

        for name, image in zip(("china", "flower"), load_sample_images().images, strict=True):
            yield name, _rgb(image)
    except ImportError:
        pass
    import matplotlib

    data = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        if (data / name).is_file():
            yield Path(name).stem, _rgb(np.asarray(Image.open(data / name)))


def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def variants(image: np.ndarray, rng: np.random.Generator, crops: int) -> Iterator[tuple[str, np.ndarray]]:
    """The photo whole, mirrored, and ``crops`` random crops of 40–80 % of each side."""
    yield "whole", image
    yield "mirrored", image[:, ::-1]
    h, w = image.shape[:2]
    for i in range(crops):
        ch, cw = int(h * rng.uniform(0.4, 0.8)), int(w * rng.uniform(0.4, 0.8))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        yield f"crop{i}", image[y : y + ch, x : x + cw]


def write_set(out: Path, crops: int = 4, seed: int = 0) -> list[Path]:
    """Write every variant of every sample photo as JPEG (quality 95) under ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for name, image in sample_photos():
        for tag, v in variants(image, rng, crops):
            path = out / f"{name}_{tag}.jpg"
            Image.fromarray(np.ascontiguousarray(v)).save(path, quality=95)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = write_set(Path(args.out), args.crops, args.seed)
    print(f"wrote {len(files)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
