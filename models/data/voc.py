"""PASCAL VOC 2007 classification (20 classes) in the sample format of :mod:`models.data`.

Layout (the VOC 2007 trainval and test tarballs unpacked into the same ``VOCdevkit``)::

    VOCdevkit/VOC2007/
        Annotations/000005.xml ...
        ImageSets/Main/trainval.txt, val.txt, test.txt (one image id per line)
        JPEGImages/000005.jpg ...

This module also holds the image reading and folder checks the other real-dataset loaders
(:mod:`models.data.coco`, :mod:`models.data.nuswide`) share.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# Split -> image set file under ImageSets/Main.
VOC_SPLIT_FILES = {"train": "trainval.txt", "val": "val.txt", "test": "test.txt"}

# How far (pixels) an annotated box may lie outside its image and still be taken as a rounding
# slip and clipped; beyond it the annotation is an error.
BOX_TOLERANCE = 1.0

Transform = Callable[[dict[str, Any]], dict[str, Any]]


# ---- shared by the real-dataset loaders -----------------------------------------------------


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
_VOC_LAYOUT = (
    "VOCdevkit/VOC2007/{Annotations/*.xml, ImageSets/Main/{trainval,val,test}.txt, "
    "JPEGImages/*.jpg}"
)


class VOC2007Dataset(ImageFilesDataset):
    """PASCAL VOC 2007 as a 20-class multi-label dataset with the objects' boxes.

    Splits (the multi-label papers train on trainval and report mAP on test):

    - ``"train"``: ``ImageSets/Main/trainval.txt`` (5011 images);
    - ``"val"``: ``ImageSets/Main/val.txt`` (2510 images). It is a subset of trainval, so scores
      on it are biased upwards by training; use it only to pick thresholds or checkpoints;
    - ``"test"``: ``ImageSets/Main/test.txt`` (4952 images, from the separate test tarball).

    Labels: a class is 1 when the image has an object of it, 0 when none. Objects marked
    ``<difficult>1</difficult>`` are handled by ``difficult``:

    - ``"ignore"`` (the VOC protocol): a class whose only objects in the image are difficult gets
      label -1 (skipped by the metrics); the difficult boxes are still returned;
    - ``"positive"``: difficult objects count like the others;
    - ``"negative"``: difficult objects are dropped entirely (neither label nor box).

    Boxes: VOC's ``<bndbox>`` holds 1-based inclusive pixel indices; they are returned as
    0-based continuous coordinates ``(xmin - 1, ymin - 1, xmax, ymax)``, so a box covering the
    whole W x H image is ``(0, 0, W, H)`` and its area is its pixel count. A box outside the
    image by at most 1 pixel is clipped to it; further out it is an error. ``objects`` lists
    exactly the returned boxes (difficult ones included under ``"ignore"`` and ``"positive"``),
    with the image size from the annotation's ``<size>``.

    Args:
        root: the ``VOCdevkit/VOC2007`` folder (or ``VOCdevkit`` holding ``VOC2007``).
        split: ``"train"``, ``"val"`` or ``"test"`` as above.
        difficult: ``"ignore"``, ``"positive"`` or ``"negative"`` as above.
        transform: applied to each sample dict, returns it.

    Attributes (besides those of :mod:`models.data`): ``ids``, the image ids in sample order;
    ``root``, ``split``, ``difficult``.

    Raises:
        FileNotFoundError: a folder, an image set file, an annotation or an image it names is
            missing (the message names it and the expected layout).
        ValueError: a malformed annotation (bad XML, missing element, unknown class name, bad
            box), an unknown split or ``difficult`` mode; the message names the file.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        difficult: Literal["ignore", "positive", "negative"] = "ignore",
        transform: Transform | None = None,
    ) -> None:
        who = "VOC2007Dataset"
        check_split(split, who)
        if difficult not in ("ignore", "positive", "negative"):
            raise ValueError(
                f"{who}: difficult must be 'ignore', 'positive' or 'negative', got {difficult!r}"
            )
        if root is None:
            raise ValueError(f"{who}: root must be the VOCdevkit/VOC2007 folder, got None")
        root = Path(root)
        require_folder(root, who, _VOC_LAYOUT)
        if not (root / "Annotations").is_dir() and (root / "VOC2007").is_dir():
            root = root / "VOC2007"
        annotations = require_folder(root / "Annotations", who, _VOC_LAYOUT)
        images = require_folder(root / "JPEGImages", who, _VOC_LAYOUT)
        image_set = root / "ImageSets" / "Main" / VOC_SPLIT_FILES[split]
        if not image_set.is_file():
            hint = (
                " (the test images and annotations come in the separate VOCtest_06-Nov-2007.tar, "
                "unpacked into the same VOCdevkit)"
                if split == "test"
                else ""
            )
            raise FileNotFoundError(
                f"{who}: split {split!r} needs {image_set}, not found{hint}; expected the layout "
                f"{_VOC_LAYOUT}"
            )

        self.root = root
        self.split = split
        self.difficult = difficult
        self.transform = transform
        self.classes = list(VOC_CLASSES)
        self.num_classes = len(self.classes)
        self.ids = _read_image_set(image_set, who)

        image_files = list_files(images)
        labels = np.zeros((len(self.ids), self.num_classes), dtype=np.float32)
        boxes: list[tuple[float, float, float, float]] = []
        box_classes: list[int] = []
        counts: list[int] = []
        sizes: list[tuple[int, int]] = []
        for i, image_id in enumerate(self.ids):
            xml_file = annotations / f"{image_id}.xml"
            size, objects = _parse_annotation(xml_file, who)
            if f"{image_id}.jpg" not in image_files:
                raise FileNotFoundError(
                    f"{who}: image {images / (image_id + '.jpg')} of {xml_file} (listed in "
                    f"{image_set}) not found"
                )
            count = 0
            for class_index, is_difficult, box in objects:
                if is_difficult and difficult == "negative":
                    continue
                boxes.append(box)
                box_classes.append(class_index)
                count += 1
                if not is_difficult or difficult == "positive":
                    labels[i, class_index] = 1.0
                elif labels[i, class_index] == 0.0:
                    labels[i, class_index] = -1.0
            counts.append(count)
            sizes.append(size)
        self.labels = torch.from_numpy(labels)
        self._set_images(
            images,
            [f"{image_id}.jpg" for image_id in self.ids],
            torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
            *pack_boxes(boxes, box_classes, counts),
        )

    def __repr__(self) -> str:
        return (
            f"VOC2007Dataset(root={str(self.root)!r}, split={self.split!r}, "
            f"difficult={self.difficult!r}, len={len(self)})"
        )


def _read_image_set(path: Path, who: str) -> list[str]:
    """The image ids of an ``ImageSets/Main/*.txt`` file (first token of each non-empty line)."""
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{who}: image set {path} lists no image")
    return ids


def _parse_annotation(
    path: Path, who: str
) -> tuple[tuple[int, int], list[tuple[int, bool, tuple[float, float, float, float]]]]:
    """``((width, height), [(class index, difficult, 0-based xyxy box), ...])`` of one VOC XML."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}: annotation {path} not found") from None
    except ET.ParseError as error:
        raise ValueError(f"{who}: annotation {path} is not valid XML: {error}") from error

    def number(element: ET.Element, tag: str, where: str) -> float:
        text = element.findtext(tag)
        if text is None:
            raise ValueError(f"{who}: annotation {path}: {where} has no <{tag}>")
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"{who}: annotation {path}: {where} <{tag}> is {text!r}, not a number"
            ) from None

    size = tree.find("size")
    if size is None:
        raise ValueError(f"{who}: annotation {path} has no <size>")
    width, height = int(number(size, "width", "<size>")), int(number(size, "height", "<size>"))
    if width <= 0 or height <= 0:
        raise ValueError(f"{who}: annotation {path}: <size> is {width}x{height}, not an image")
    objects = []
    for k, obj in enumerate(tree.iterfind("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"<object> {k} ({name!r})"
        if name not in VOC_CLASSES:
            raise ValueError(
                f"{who}: annotation {path}: {where} has unknown class name {name!r}; expected "
                f"one of the 20 VOC classes {', '.join(VOC_CLASSES)}"
            )
        difficult_text = (obj.findtext("difficult") or "0").strip()
        if difficult_text not in ("0", "1"):
            raise ValueError(
                f"{who}: annotation {path}: {where} <difficult> is {difficult_text!r}, "
                "expected 0 or 1"
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{who}: annotation {path}: {where} has no <bndbox>")
        xmin, ymin, xmax, ymax = (
            number(bndbox, t, where) for t in ("xmin", "ymin", "xmax", "ymax")
        )
        box = clip_box(
            (xmin - 1.0, ymin - 1.0, xmax, ymax),
            width,
            height,
            f"{who}: annotation {path}: {where} (0-based)",
        )
        objects.append((VOC_CLASSES.index(name), difficult_text == "1", box))
    return (width, height), objects
