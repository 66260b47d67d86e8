"""MS-COCO 2014 / 2017 (80 classes) as a multi-label dataset in the sample format of
:mod:`models.data`, read from the instances annotations with pycocotools.

Layout (as unpacked from the official zips)::

    ROOT/annotations/instances_train2014.json, instances_val2014.json
    ROOT/train2014/*.jpg, ROOT/val2014/*.jpg
    (or the same with 2017)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from models.data.files import (
    BOX_TOLERANCE,
    ImageFilesDataset,
    Transform,
    check_split,
    clip_box,
    list_files,
    require_folder,
)

COCO_YEARS = (2014, 2017)

# The held-out validation images: every VAL_EVERY-th image of train20xx in image-id order
# (positions 0, VAL_EVERY, 2 * VAL_EVERY, ...), 5%.
VAL_EVERY = 20

_COCO_LAYOUT = (
    "ROOT/annotations/instances_{train,val}{2014|2017}.json with the images in "
    "ROOT/{train,val}{2014|2017}/"
)


class COCODataset(ImageFilesDataset):
    """MS-COCO instances as a multi-label dataset with the objects' boxes.

    Splits (the multi-label papers train on train20xx and report mAP on val20xx):

    - ``"train"``: train20xx without the held-out images of ``"val"``, i.e. 95% of it; the
      papers train on all of train20xx, so numbers may differ slightly from theirs;
    - ``"val"``: every 20th image of train20xx in image-id order (positions 0, 20, 40, ...): an
      unbiased set for picking thresholds and checkpoints, disjoint from ``"test"``;
    - ``"test"``: val20xx (40504 images in 2014, 5000 in 2017).

    The held-out images are chosen before ``without_annotations`` drops any, so an image is in
    the same split whichever option is used.

    Classes: the JSON's categories sorted by category id (the real ids run 1..90 with gaps, so
    index ``k`` is the k-th category by id, not id ``k``), named by the JSON.

    Labels: a class is 1 when the image has an annotation of it, 0 otherwise. Crowd annotations
    (``iscrowd=1``, a group of objects under one box) count like the others, as in the papers'
    label files; their boxes are returned too, so every positive label has a box. An image whose
    only annotations are crowd ones thus has positive labels, and ``"drop"`` below keeps it.

    Images without any annotation (about 1% of COCO; none of its classes is in them):
    ``without_annotations="keep"`` keeps them with all-zero labels; ``"drop"`` leaves them out,
    as the ASL / ML-Decoder loaders do (82081 train2014 and 40137 val2014 images).

    Boxes: COCO's ``[x, y, width, height]`` become ``(x, y, x + width, y + height)`` in pixels.
    A box outside the image by at most 1 pixel is clipped to it; further out it is an error.
    Boxes of zero width or height (a few in COCO) are kept. ``objects`` lists exactly the
    returned boxes, with the image size from the JSON's ``images`` entry.

    Args:
        root: the folder with ``annotations/`` and the image folders.
        split: ``"train"``, ``"val"`` or ``"test"`` as above.
        year: 2014 or 2017; None finds the one whose annotations are present (an error when
            both or neither are).
        without_annotations: ``"keep"`` or ``"drop"`` as above.
        transform: applied to each sample dict, returns it.

    Attributes (besides those of :mod:`models.data`): ``image_ids``, the COCO image ids in
    sample order; ``root``, ``split``, ``year``, ``without_annotations``, ``annotation_file``.

    Raises:
        FileNotFoundError: a folder, the annotation file or an image it names is missing.
        ValueError: a malformed annotation file (truncated JSON, a missing field, an annotation
            of an unknown category or image, a bad box), an ambiguous year, an unknown option;
            the message names the file.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        year: int | None = None,
        without_annotations: Literal["keep", "drop"] = "keep",
        transform: Transform | None = None,
    ) -> None:
        who = "COCODataset"
        check_split(split, who)
        if without_annotations not in ("keep", "drop"):
            raise ValueError(
                f"{who}: without_annotations must be 'keep' or 'drop', got {without_annotations!r}"
            )
        if year is not None and year not in COCO_YEARS:
            raise ValueError(f"{who}: year must be one of {COCO_YEARS} or None, got {year!r}")
        if root is None:
            raise ValueError(f"{who}: root must be the COCO folder, got None")
        root = Path(root)
        require_folder(root, who, _COCO_LAYOUT)
        annotations = require_folder(root / "annotations", who, _COCO_LAYOUT)
        if year is None:
            year = _detect_year(annotations, who)
        subset = f"{'val' if split == 'test' else 'train'}{year}"
        annotation_file = annotations / f"instances_{subset}.json"
        if not annotation_file.is_file():
            raise FileNotFoundError(
                f"{who}: split {split!r} of COCO {year} needs {annotation_file}, not found; "
                f"expected the layout {_COCO_LAYOUT}"
            )
        images = require_folder(root / subset, who, _COCO_LAYOUT)

        self.root = root
        self.split = split
        self.year = year
        self.without_annotations = without_annotations
        self.transform = transform
        self.annotation_file = annotation_file

        coco = _load_coco(annotation_file, who)
        try:
            categories = sorted(coco.dataset["categories"], key=lambda c: c["id"])
            category_ids = [c["id"] for c in categories]
            class_names = [str(c["name"]) for c in categories]
            image_entries = sorted(coco.dataset["images"], key=lambda e: e["id"])
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{who}: annotation file {annotation_file}: 'categories' and 'images' must be "
                f"lists of objects with 'id' and 'name' / 'id' fields ({error!r})"
            ) from error
        if not categories:
            raise ValueError(f"{who}: annotation file {annotation_file} has no categories")
        if len(set(category_ids)) != len(category_ids):
            raise ValueError(
                f"{who}: annotation file {annotation_file} repeats a category id: {category_ids}"
            )
        category_index = {category_id: k for k, category_id in enumerate(category_ids)}
        self.classes = class_names
        self.num_classes = len(class_names)
        _check_annotation_images(coco, annotation_file, who)

        if split != "test":
            image_entries = [
                e for k, e in enumerate(image_entries) if (k % VAL_EVERY == 0) == (split == "val")
            ]
        if without_annotations == "drop":
            image_entries = [e for e in image_entries if coco.imgToAnns.get(e["id"])]

        image_files = list_files(images)
        names: list[str] = []
        sizes: list[tuple[int, int]] = []
        for entry in image_entries:
            file_name, width, height = _image_fields(entry, annotation_file, who)
            if file_name not in image_files:
                raise FileNotFoundError(
                    f"{who}: image {images / file_name} (image id {entry['id']} of "
                    f"{annotation_file}) not found"
                )
            names.append(file_name)
            sizes.append((width, height))
        per_image = [coco.imgToAnns.get(entry["id"], []) for entry in image_entries]
        counts = np.array([len(of_image) for of_image in per_image], dtype=np.int64)
        image_sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)
        box_classes, boxes = _annotation_arrays(
            [annotation for of_image in per_image for annotation in of_image],
            category_index,
            np.repeat(image_sizes, counts, axis=0),
            annotation_file,
            who,
        )
        labels = np.zeros((len(image_entries), self.num_classes), dtype=np.float32)
        labels[np.repeat(np.arange(len(image_entries)), counts), box_classes] = 1.0
        self.image_ids = [int(entry["id"]) for entry in image_entries]
        self.labels = torch.from_numpy(labels)
        self._set_images(
            images,
            names,
            torch.from_numpy(image_sizes),
            torch.from_numpy(boxes),
            torch.from_numpy(box_classes),
            torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)),
        )

    def __repr__(self) -> str:
        return (
            f"COCODataset(root={str(self.root)!r}, split={self.split!r}, year={self.year}, "
            f"without_annotations={self.without_annotations!r}, len={len(self)})"
        )


def _detect_year(annotations: Path, who: str) -> int:
    """The one year of :data:`COCO_YEARS` with an instances file in ``annotations``."""
    found = [
        year
        for year in COCO_YEARS
        if any((annotations / f"instances_{s}{year}.json").is_file() for s in ("train", "val"))
    ]
    if not found:
        raise FileNotFoundError(
            f"COCODataset: no instances_{{train,val}}{{2014,2017}}.json in {annotations}; "
            f"expected the layout {_COCO_LAYOUT}"
        )
    if len(found) > 1:
        raise ValueError(
            f"COCODataset: {annotations} holds the annotations of COCO {found[0]} and "
            f"{found[1]}; pass year= to pick one"
        )
    return found[0]


def _load_coco(path: Path, who: str):
    """``pycocotools.coco.COCO(path)`` with its progress prints silenced; ValueError naming the
    file when it is not a COCO instances JSON."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{who}: annotation file {path} is not valid JSON (truncated?): {error}"
        ) from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{who}: annotation file {path} is not UTF-8 JSON: {error}") from error
    except (AssertionError, KeyError, TypeError) as error:
        raise ValueError(
            f"{who}: annotation file {path} is not a COCO instances file (a JSON object with "
            f"'images', 'annotations' and 'categories' lists, each entry with an 'id'): {error!r}"
        ) from error
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.dataset.get(key), list):
            raise ValueError(f"{who}: annotation file {path} has no {key!r} list")
    return coco


def _check_annotation_images(coco, path: Path, who: str) -> None:
    """ValueError naming ``path`` when an annotation refers to an image id it does not list."""
    unknown = set(coco.imgToAnns) - set(coco.imgs)
    if unknown:
        first = coco.imgToAnns[min(unknown)][0]
        raise ValueError(
            f"{who}: annotation file {path}: annotation {first.get('id')} (and "
            f"{len(unknown) - 1} more image ids) refers to image id {first['image_id']}, which "
            "its 'images' do not list"
        )


def _image_fields(entry: dict[str, Any], path: Path, who: str) -> tuple[str, int, int]:
    """``(file_name, width, height)`` of an ``images`` entry; ValueError naming ``path``."""
    try:
        file_name = str(entry["file_name"])
        width, height = int(entry["width"]), int(entry["height"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{who}: annotation file {path}: image {entry.get('id')} needs 'file_name', 'width' "
            f"and 'height' ({error!r})"
        ) from error
    if width <= 0 or height <= 0:
        raise ValueError(
            f"{who}: annotation file {path}: image {entry.get('id')} is {width}x{height}"
        )
    return file_name, width, height


def _annotation_arrays(
    annotations: list[dict[str, Any]],
    category_index: dict[int, int],
    sizes: np.ndarray,
    path: Path,
    who: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``(class indices [M] int64, clipped xyxy boxes [M, 4] float32)`` of ``M`` annotations
    whose images are ``sizes`` ``[M, 2]`` (width, height).

    Checked in bulk (COCO has close to a million annotations); when a check fails they are
    checked one by one by :func:`_annotation_fields`, whose error names the file and the first
    bad annotation.
    """
    count = len(annotations)
    try:
        classes = np.array([category_index[a["category_id"]] for a in annotations], np.int64)
        xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64)
        xywh = xywh.reshape(0, 4) if count == 0 else xywh
        valid = (
            xywh.shape == (count, 4)
            and bool(np.isfinite(xywh).all())
            and bool((xywh[:, 2:] >= 0).all())
        )
    except (KeyError, TypeError, ValueError):
        valid = False
    if valid:
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        limits = np.concatenate([sizes, sizes], axis=1).astype(np.float64)
        valid = bool((xyxy >= -BOX_TOLERANCE).all() and (xyxy <= limits + BOX_TOLERANCE).all())
    if not valid:
        for annotation, (width, height) in zip(annotations, sizes.tolist(), strict=True):
            _annotation_fields(annotation, category_index, width, height, path, who)
        raise ValueError(f"{who}: annotation file {path}: malformed annotations")
    return classes, np.clip(xyxy, 0.0, limits).astype(np.float32)


def _annotation_fields(
    annotation: dict[str, Any],
    category_index: dict[int, int],
    width: int,
    height: int,
    path: Path,
    who: str,
) -> tuple[int, tuple[float, float, float, float]]:
    """``(class index, xyxy box)`` of one annotation; ValueError naming ``path``."""
    where = f"{who}: annotation file {path}: annotation {annotation.get('id')}"
    category = annotation.get("category_id")
    if category not in category_index:
        raise ValueError(
            f"{where} has category_id {category!r}, not one of the file's categories "
            f"{sorted(category_index)}"
        )
    bbox = annotation.get("bbox")
    if (
        not isinstance(bbox, list | tuple)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
    ):
        raise ValueError(f"{where} has bbox {bbox!r}, expected [x, y, width, height]")
    x, y, w, h = (float(v) for v in bbox)
    return category_index[category], clip_box((x, y, x + w, y + h), width, height, where)
