"""PASCAL VOC 2007 classification (20 classes) in the sample format of :mod:`models.data`.

Layout (the VOC 2007 trainval and test tarballs unpacked into the same ``VOCdevkit``)::

    VOCdevkit/VOC2007/
        Annotations/000005.xml ...
        ImageSets/Main/trainval.txt, val.txt, test.txt (one image id per line)
        JPEGImages/000005.jpg ...
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.data.files import (
    ImageFilesDataset,
    Transform,
    check_split,
    clip_box,
    list_files,
    pack_boxes,
    require_folder,
)

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
