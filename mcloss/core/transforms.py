"""Eval/train transforms with known geometry, so maps and keypoints map exactly between image and tensor."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from mcloss.core.errors import ParameterError

__all__ = [
    "Geometry",
    "features_to_original",
    "EvalTransform",
    "TrainTransform",
    "NORMALIZATIONS",
]

#: Normalizations by name: the official from-scratch code uses 0.5/0.5, pretrained models ImageNet's.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class Geometry:
    """How one original image of size (width, height) lands on the network input.

    The image is resized to ``resized`` = (w, h), then the box ``crop`` = (left, top, w, h) of the
    resized image becomes the input. Coordinates use the pixel-centre convention: pixel i covers [i, i+1).
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): resized pixels per original pixel."""
        return self.resized[0] / self.original[0], self.resized[1] / self.original[1]

    def to_input(self, points: np.ndarray) -> np.ndarray:
        """Map [N, 2] (x, y) points from original-image to input-tensor coordinates."""
        sx, sy = self.scale
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return np.stack([pts[:, 0] * sx - self.crop[0], pts[:, 1] * sy - self.crop[1]], axis=1)

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Map [N, 2] (x, y) points from input-tensor to original-image coordinates."""
        sx, sy = self.scale
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return np.stack([(pts[:, 0] + self.crop[0]) / sx, (pts[:, 1] + self.crop[1]) / sy], axis=1)

    def feature_to_original(self, points: np.ndarray, feature_hw: tuple[int, int]) -> np.ndarray:
        """Map [N, 2] (x, y) feature-cell indices to the original-image position of the cell centres."""
        return features_to_original(points, [self], feature_hw)

    def original_to_feature_affine(self, feature_hw: tuple[int, int]) -> np.ndarray:
        """The 2×3 affine taking original pixel indices to feature pixel indices (for cv2 WARP_INVERSE_MAP)."""
        fh, fw = feature_hw
        sx, sy = self.scale
        ax = sx * fw / self.crop[2]
        ay = sy * fh / self.crop[3]
        bx = 0.5 * ax - self.crop[0] * fw / self.crop[2] - 0.5
        by = 0.5 * ay - self.crop[1] * fh / self.crop[3] - 0.5
        return np.array([[ax, 0.0, bx], [0.0, ay, by]], dtype=np.float64)


def features_to_original(points: np.ndarray, geometries: Sequence[Geometry], feature_hw: tuple[int, int]) -> np.ndarray:
    """:meth:`Geometry.feature_to_original` of [N, 2] points, point i through ``geometries[i]`` (one geometry:
    all through it), in one pass: the same float64 operations, so the same values to the bit."""
    fh, fw = feature_hw
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(geometries) not in (1, len(pts)):
        raise ParameterError(f"geometries: {len(geometries)} for {len(pts)} points (one, or one per point)", parameter="geometries")
    original = np.array([g.original for g in geometries], dtype=np.float64)
    resized = np.array([g.resized for g in geometries], dtype=np.float64)
    crop = np.array([g.crop for g in geometries], dtype=np.float64)
    inp_x = (pts[:, 0] + 0.5) * crop[:, 2] / fw
    inp_y = (pts[:, 1] + 0.5) * crop[:, 3] / fh
    sx, sy = resized[:, 0] / original[:, 0], resized[:, 1] / original[:, 1]
    return np.stack([(inp_x + crop[:, 0]) / sx, (inp_y + crop[:, 1]) / sy], axis=1)


def _resized_size(size: int | Sequence[int], width: int, height: int) -> tuple[int, int]:
    """torchvision's Resize semantics: an int sets the shorter side, a pair (h, w) the exact size."""
    if isinstance(size, int):
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size
    h, w = size
    return int(w), int(h)


@dataclass(frozen=True)
class EvalTransform:
    """PIL RGB image → normalized tensor: resize, optional centre crop, normalize.

    Attributes:
        resize: int (shorter side) or [h, w] (exact), as torchvision's Resize.
        crop: [h, w] of the centre crop, or None.
        mean, std: per-channel normalization.
    """

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] = NORMALIZATIONS["half"][0]
    std: tuple[float, float, float] = NORMALIZATIONS["half"][1]

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(h, w) of the input tensor when fixed by the transform, else None."""
        if self.crop is not None:
            return tuple(self.crop)
        return None if isinstance(self.resize, int) else tuple(self.resize)

    def geometry(self, width: int, height: int) -> Geometry:
        """The geometry for an original image of the given size."""
        rw, rh = _resized_size(self.resize, width, height)
        if self.crop is None:
            box = (0, 0, rw, rh)
        else:
            ch, cw = self.crop
            box = (int(round((rw - cw) / 2.0)), int(round((rh - ch) / 2.0)), cw, ch)
        return Geometry((width, height), (rw, rh), box)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        geo = self.geometry(*image.size)
        return self.apply(image, geo)

    def apply(self, image: Image.Image, geo: Geometry) -> torch.Tensor:
        """Transform ``image`` with a precomputed geometry."""
        img = image.convert("RGB") if image.mode != "RGB" else image
        img = img.resize(geo.resized, Image.BILINEAR)
        left, top, w, h = geo.crop
        if (left, top, w, h) != (0, 0, *geo.resized):
            img = TF.crop(img, top, left, h, w)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def to_dict(self) -> dict:
        """JSON-friendly description (stored in checkpoints)."""
        d = asdict(self)
        d["resize"] = self.resize if isinstance(self.resize, int) else list(self.resize)
        d["crop"] = None if self.crop is None else list(self.crop)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalTransform:
        resize = d["resize"] if isinstance(d["resize"], int) else tuple(int(v) for v in d["resize"])
        crop = None if d.get("crop") is None else tuple(int(v) for v in d["crop"])
        return cls(resize, crop, tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))

    @classmethod
    def for_recipe(cls, recipe: str, img_size: int, normalization: str = "half") -> EvalTransform:
        """The official eval transform: scratch = Resize((S, S)); pretrained = Resize(S·600/448) + CenterCrop(S)."""
        mean, std = NORMALIZATIONS[normalization]
        if recipe == "official-pretrained":
            return cls(int(round(img_size * 600 / 448)), (img_size, img_size), mean, std)
        return cls((img_size, img_size), None, mean, std)


@dataclass(frozen=True)
class TrainTransform:
    """Train augmentation that carries keypoints: resize, random crop (with padding), horizontal flip.

    Called as ``transform(image, points)`` with points [N, 2] in original pixels; returns
    ``(tensor, points)`` with points in input-tensor pixels (x mirrored on flip). With ``points=None``
    the second element is None.
    """

    resize: int | tuple[int, int]
    crop: tuple[int, int]
    padding: int = 4
    flip: bool = True
    mean: tuple[float, float, float] = NORMALIZATIONS["half"][0]
    std: tuple[float, float, float] = NORMALIZATIONS["half"][1]

    @classmethod
    def for_recipe(cls, recipe: str, img_size: int, normalization: str = "half") -> TrainTransform:
        """Official train transforms: scratch = Resize((S,S)) + RandomCrop(S, pad 4) + flip;
        pretrained = Resize(S·600/448) + RandomCrop(S) + flip."""
        mean, std = NORMALIZATIONS[normalization]
        if recipe == "official-pretrained":
            return cls(int(round(img_size * 600 / 448)), (img_size, img_size), 0, True, mean, std)
        return cls((img_size, img_size), (img_size, img_size), 4, True, mean, std)

    def __call__(
        self, image: Image.Image, points: np.ndarray | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        img = image.convert("RGB") if image.mode != "RGB" else image
        w0, h0 = img.size
        rw, rh = _resized_size(self.resize, w0, h0)
        img = img.resize((rw, rh), Image.BILINEAR)
        tensor = TF.to_tensor(img)
        if self.padding:
            tensor = torch.nn.functional.pad(tensor, [self.padding] * 4)
        ch, cw = self.crop
        _, ph, pw = tensor.shape
        top = random.randint(0, max(0, ph - ch))
        left = random.randint(0, max(0, pw - cw))
        tensor = tensor[:, top : top + ch, left : left + cw]
        flipped = self.flip and random.random() < 0.5
        if flipped:
            tensor = tensor.flip(-1)
        tensor = TF.normalize(tensor, self.mean, self.std)
        if points is None:
            return tensor, None
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2).copy()
        pts[:, 0] = pts[:, 0] * rw / w0 + self.padding - left
        pts[:, 1] = pts[:, 1] * rh / h0 + self.padding - top
        if flipped:
            pts[:, 0] = cw - pts[:, 0]
        return tensor, pts
