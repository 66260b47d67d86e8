"""What the real-dataset loaders (:mod:`models.data.voc`, :mod:`models.data.coco`,
:mod:`models.data.nuswide`) share: folder checks, image reading, box clipping, the objects table
and :class:`ImageFilesDataset`, the sample format of :mod:`models.data` over image files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

# How far (pixels) an annotated box may lie outside its image and still be taken as a rounding
# slip and clipped; beyond it the annotation is an error.
BOX_TOLERANCE = 1.0

Transform = Callable[[dict[str, Any]], dict[str, Any]]


def require_folder(path: Path, who: str, layout: str) -> Path:
    """``path`` if it is a folder; else FileNotFoundError naming it and the expected layout."""
    if not path.is_dir():
        raise FileNotFoundError(f"{who}: folder {path} not found; expected the layout {layout}")
    return path


def list_files(folder: Path) -> set[str]:
    """The names of the entries of ``folder`` (one directory listing, no per-file stat)."""
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries}


def read_rgb_image(
    path: Path, who: str, expected_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """An image file as ``Tensor[3, H, W]`` uint8 RGB.

    Grayscale, CMYK, palette and RGBA files are converted to RGB (alpha dropped). EXIF
    orientation is not applied: the annotations of VOC and COCO are in the stored pixel grid.

    Args:
        path: the image file.
        who: the dataset, named in error messages.
        expected_size: ``(width, height)`` the annotations were made on, checked when given.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a readable image, or its size is not ``expected_size``.
    """
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}: image {path} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{who}: image {path} cannot be read: {error}") from error
    if expected_size is not None and rgb.size != tuple(expected_size):
        raise ValueError(
            f"{who}: image {path} is {rgb.size[0]}x{rgb.size[1]} pixels but its annotation says "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def clip_box(
    box: tuple[float, float, float, float], width: float, height: float, where: str
) -> tuple[float, float, float, float]:
    """An (x1, y1, x2, y2) pixel box clipped to the image ``[0, width] x [0, height]``.

    A box that lies outside the image by at most :data:`BOX_TOLERANCE` pixels (a rounding slip
    of the annotation tool) is clipped; one further outside, or with x2 < x1 or y2 < y1, is a
    ValueError naming ``where`` (the file and the object). Degenerate boxes (zero width or
    height, which COCO has) are kept.
    """
    x1, y1, x2, y2 = box
    if not all(np.isfinite(box)) or x2 < x1 or y2 < y1:
        raise ValueError(
            f"{where}: box (x1, y1, x2, y2) = {box} is not a box "
            "(not finite, or x2 < x1 or y2 < y1)"
        )
    if (
        x1 < -BOX_TOLERANCE
        or y1 < -BOX_TOLERANCE
        or x2 > width + BOX_TOLERANCE
        or y2 > height + BOX_TOLERANCE
    ):
        raise ValueError(
            f"{where}: box (x1, y1, x2, y2) = {box} lies outside the {width}x{height} image by "
            f"more than {BOX_TOLERANCE} pixel"
        )
    return (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )


def objects_table(
    boxes: torch.Tensor, box_classes: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The ``objects`` attribute of :mod:`models.data` from the boxes of all samples.

    Args:
        boxes: ``Tensor[M, 4]`` float32 xyxy pixels, every sample's boxes in sample order.
        box_classes: ``Tensor[M]`` int64.
        offsets: ``Tensor[len + 1]`` int64, sample ``i``'s boxes are ``offsets[i]:offsets[i+1]``.
        sizes: ``Tensor[len, 2]`` int64, each sample's image ``(width, height)``.

    Returns:
        ``{"image": Tensor[M] int64, "class": Tensor[M] int64, "area_fraction": Tensor[M]
        float32}``.
    """
    image = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), offsets.diff())
    boxes = boxes.double()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    image_areas = sizes.double().prod(dim=1)[image]
    return {
        "image": image,
        "class": box_classes.clone(),
        "area_fraction": (areas / image_areas).float(),
    }


def pack_boxes(
    boxes: list[tuple[float, float, float, float]], box_classes: list[int], counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat Python lists of every sample's boxes as ``(Tensor[M, 4] float32, Tensor[M] int64,
    offsets Tensor[len + 1] int64)``; ``counts[i]`` is sample ``i``'s number of boxes."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(counts, dtype=torch.int64), dim=0, out=offsets[1:])
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(box_classes, dtype=torch.int64),
        offsets,
    )


def check_split(split: str, who: str, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """ValueError naming ``who`` unless ``split`` is one of ``splits``."""
    if split not in splits:
        raise ValueError(f"{who}: split must be one of {splits}, got {split!r}")


class ImageFilesDataset(Dataset):
    """Base of the real-dataset loaders: image files plus labels and boxes read up front.

    A subclass's constructor sets ``classes``, ``num_classes``, ``labels`` (``Tensor[len, C]``
    float32), ``transform`` and calls :meth:`_set_images` with the images' folder and names,
    their annotated sizes and the packed boxes (:func:`pack_boxes`); this class provides
    ``len()``, ``objects`` and ``__getitem__`` in the sample format of :mod:`models.data`,
    opening images lazily (so a missing or corrupt image is an error of ``dataset[i]``, naming
    the file).
    """

    classes: list[str]
    num_classes: int
    labels: torch.Tensor
    objects: dict[str, torch.Tensor]
    transform: Transform | None

    def _set_images(
        self,
        folder: Path,
        names: list[str],
        sizes: torch.Tensor | None,
        boxes: torch.Tensor,
        box_classes: torch.Tensor,
        offsets: torch.Tensor,
    ) -> None:
        """Args: folder and names (sample ``i`` is the image ``folder / names[i]``), sizes
        (``Tensor[len, 2]`` int64 annotated (width, height), or None where a dataset has no
        boxes: nothing checked, ``objects`` empty), boxes, box_classes, offsets as returned by
        :func:`pack_boxes`."""
        self._folder = folder
        self._names = names
        self._sizes = sizes
        self._boxes, self._box_classes, self._offsets = boxes, box_classes, offsets
        if sizes is None:
            empty = torch.zeros(0, dtype=torch.int64)
            self.objects = {
                "image": empty,
                "class": empty.clone(),
                "area_fraction": torch.zeros(0, dtype=torch.float32),
            }
        else:
            self.objects = objects_table(boxes, box_classes, offsets, sizes)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index``: ``{"image": Tensor[3, H, W] uint8, "labels": Tensor[C] float32,
        "boxes": Tensor[N, 4] float32, "box_classes": Tensor[N] int64, "index": int}``, passed
        through ``transform`` when set."""
        who = type(self).__name__
        if not isinstance(index, int | np.integer) or isinstance(index, bool):
            raise TypeError(f"{who}: index must be an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"{who}: index {index} out of range for {len(self)} samples")
        index = int(index) % len(self)
        size = None if self._sizes is None else tuple(self._sizes[index].tolist())
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        sample = {
            "image": read_rgb_image(self._folder / self._names[index], who, size),
            "labels": self.labels[index].clone(),
            "boxes": self._boxes[start:end].clone(),
            "box_classes": self._box_classes[start:end].clone(),
            "index": index,
        }
        return self.transform(sample) if self.transform is not None else sample


# ---- VOC 2007 -------------------------------------------------------------------------------

_BNDBOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
