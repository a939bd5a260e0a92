"""Images ready for the network: the eval transform applied to a decoded file, alone or in DataLoader workers.

A :class:`PreparedImage` holds the network input, where the original lands on it, and optionally a view of
the original for drawing. Which view is kept is the caller's choice, passed as a function of the decoded RGB
array (the explainability layer's fit-to-size or thumbnail); this layer only decodes and transforms.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mcloss.core.transforms import EvalTransform, Geometry
from mcloss.data.files import InputFile
from mcloss.data.io import ImageLoadError, load_image, to_rgb

__all__ = ["ImageFiles", "PreparedImage", "ViewMaker", "collate_items", "prepare_image"]

#: Makes the view kept for drawing from the decoded RGB uint8 original (``[H, W, 3]`` in, any size out).
#: DataLoader workers get it with the dataset, so a picklable one (a module-level function, or a
#: ``functools.partial`` of one) also works under the spawn start method.
ViewMaker = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the network.

    Attributes:
        x: [3, H, W] the eval transform's output.
        geometry: how the original lands on ``x``.
        view: RGB uint8 view of the original for drawing (any size, same aspect ratio), or None.
        source: the file it came from, or None.
    """

    x: torch.Tensor
    geometry: Geometry
    view: np.ndarray | None = None
    source: str | None = None


def prepare_image(
    transform: EvalTransform, image: Image.Image | str | os.PathLike, view: ViewMaker | None = None
) -> PreparedImage:
    """Apply ``transform`` to a PIL RGB image or an image file (decoded by :func:`mcloss.data.io.load_image`:
    EXIF-rotated, safe against broken files); keep ``view(original)`` for drawing, or no view when None."""
    source = None
    if not isinstance(image, Image.Image):
        source = os.fspath(image)
        image = load_image(image)
    elif image.mode != "RGB":  # an image the caller opened: read as its file would be
        image = to_rgb(image)
    geo = transform.geometry(*image.size)
    x = transform.apply(image, geo)
    kept = None if view is None else view(np.asarray(image))
    return PreparedImage(x, geo, kept, source)


class ImageFiles(Dataset):
    """Decodes inputs in DataLoader workers: an item is (index, PreparedImage) or (index, error string).

    ``view`` makes each prepared image's view (e.g. the montage thumbnail); None keeps none, for passes
    that draw nothing.
    """

    def __init__(self, files: Sequence[InputFile], transform: EvalTransform, view: ViewMaker | None = None) -> None:
        self.files = list(files)
        self.transform = transform
        self.view = view

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, PreparedImage | str]:
        source = self.files[index].source
        try:
            return index, prepare_image(self.transform, source, self.view)
        except ImageLoadError as exc:
            return index, str(exc)
        except Exception as exc:  # noqa: BLE001 - a worker must never die on one bad file
            return index, f"{source}: {type(exc).__name__}: {exc}"


def collate_items(items: list) -> list:
    """DataLoader ``collate_fn`` that keeps a batch as the list of its items.

    From a worker the list travels packed (:class:`_Items`): the images' tensors in one block per shape and
    dtype, so the batch's images share one file descriptor on their way instead of one each. There each ``x``
    is a view of its block, which it keeps alive: ``x.clone()`` keeps one image apart.
    """
    return _Items(items)


class _Items(list):
    """A batch's ``(index, PreparedImage | str)`` items, which pickle with the images' ``x`` stacked: one
    tensor, so one shared-memory block, per shape and dtype. A DataLoader worker hands every tensor it sends
    over by its own file descriptor, and on the H200 node taking them back cost the export's process 1.8 ms an
    image (``benchmarks/h200-2026-12-04-writers/profile_no_montage.txt``), while its model ran 0.07 ms.
    Unpickled, it is a plain list again, each ``x`` a view of its stack. A copy (``copy.copy``, as the
    DataLoader's memory pinning makes of a batch decoded in process) is a plain shallow copy."""

    def __copy__(self) -> _Items:
        return _Items(self)

    def __reduce__(self) -> tuple:
        groups: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        bare, rows = [], []
        for index, item in self:
            if isinstance(item, PreparedImage):
                key = (tuple(item.x.shape), item.x.dtype)
                group = groups.setdefault(key, [])
                rows.append((key, len(group)))
                group.append(item.x)
                item = PreparedImage(None, item.geometry, item.view, item.source)  # type: ignore[arg-type]
            else:
                rows.append(None)
            bare.append((index, item))
        stacks = {}
        for (shape, dtype), xs in groups.items():  # straight into shared memory: pickling copies nothing more
            stacks[shape, dtype] = torch.stack(xs, out=torch.empty((len(xs), *shape), dtype=dtype).share_memory_())
        return _unpack_items, (bare, rows, stacks)


def _unpack_items(bare: list, rows: list, stacks: dict) -> list:
    """The items of a pickled :class:`_Items`: each image's ``x`` a view of its stack."""
    return [
        (index, item if row is None else PreparedImage(stacks[row[0]][row[1]], item.geometry, item.view, item.source))
        for (index, item), row in zip(bare, rows, strict=True)
    ]
