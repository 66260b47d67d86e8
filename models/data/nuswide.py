"""NUS-WIDE (81 concepts) as a multi-label dataset in the sample format of :mod:`models.data`.

Layout (the NUS-WIDE "Groundtruth" and "ImageList" archives plus the downloaded images)::

    ROOT/Concepts81.txt: the 81 concept names, one a line
    ROOT/ImageList/TrainImagelist.txt, TestImagelist.txt: image paths under Flickr/, one a
        line, with backslashes (actor\\0001_2124494179.jpg)
    ROOT/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt, ..._Test.txt: one 0/1 a
        line, aligned with the image list
    ROOT/Flickr/<concept>/<id>.jpg: the images
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from models.data.files import ImageFilesDataset, Transform, check_split, pack_boxes, require_folder

# The held-out validation images: every VAL_EVERY-th image of the Train list (positions 0,
# VAL_EVERY, 2 * VAL_EVERY, ... of the list as published, missing images included), 5%.
VAL_EVERY = 20

_NUSWIDE_LAYOUT = (
    "ROOT/{Concepts81.txt, ImageList/{Train,Test}Imagelist.txt, "
    "Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt, Flickr/<image paths>}"
)


class NUSWIDEDataset(ImageFilesDataset):
    """NUS-WIDE's 81 concepts as a multi-label dataset (no boxes).

    Splits:

    - ``"train"``: the Train image list without the held-out images of ``"val"`` (95% of it);
    - ``"val"``: every 20th image of the Train list (positions 0, 20, 40, ... of the list as
      published, so the choice does not depend on which images one has), for picking thresholds
      and checkpoints;
    - ``"test"``: the Test image list.

    Labels: ``Labels_<concept>_{Train,Test}.txt``, 1 present, 0 absent (never -1). Images with
    no concept at all (many in NUS-WIDE) are kept, with all-zero labels.

    Missing images: many NUS-WIDE URLs are dead, so people hold subsets. Images of the list that
    are not on disk under ``Flickr/`` are skipped: the dataset holds the others, ``skipped``
    lists the skipped paths (relative to ``Flickr/``, with ``/``) and a ``UserWarning`` says how
    many. A split with no image on disk at all is an error (a wrong folder, most likely).

    No boxes: every sample's ``"boxes"`` is ``Tensor[0, 4]`` and ``objects`` is empty.

    Args:
        root: the folder holding ``Concepts81.txt``, ``ImageList/``, ``Groundtruth/`` and
            ``Flickr/``.
        split: ``"train"``, ``"val"`` or ``"test"`` as above.
        transform: applied to each sample dict, returns it.

    Attributes (besides those of :mod:`models.data`): ``image_names``, the images' paths under
    ``Flickr/`` in sample order; ``skipped``; ``root``, ``split``.

    Raises:
        FileNotFoundError: a folder or file of the layout is missing, or no image of the split
            is on disk.
        ValueError: a malformed file (a labels file whose number of lines is not the image
            list's, a label that is not 0 or 1, an empty concepts file or image list); the
            message names the file.
    """

    skipped: list[str]

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        transform: Transform | None = None,
    ) -> None:
        who = "NUSWIDEDataset"
        check_split(split, who)
        if root is None:
            raise ValueError(f"{who}: root must be the NUS-WIDE folder, got None")
        root = Path(root)
        require_folder(root, who, _NUSWIDE_LAYOUT)
        image_lists = require_folder(root / "ImageList", who, _NUSWIDE_LAYOUT)
        label_folder = require_folder(
            root / "Groundtruth" / "TrainTestLabels", who, _NUSWIDE_LAYOUT
        )
        flickr = require_folder(root / "Flickr", who, _NUSWIDE_LAYOUT)
        part = "Test" if split == "test" else "Train"

        self.root = root
        self.split = split
        self.transform = transform
        self.classes = _read_lines(root / "Concepts81.txt", who, "concept names")
        self.num_classes = len(self.classes)

        list_file = image_lists / f"{part}Imagelist.txt"
        names = [name.replace("\\", "/") for name in _read_lines(list_file, who, "image paths")]
        labels = np.zeros((len(names), self.num_classes), dtype=np.float32)
        for k, concept in enumerate(self.classes):
            labels[:, k] = _read_labels(
                label_folder / f"Labels_{concept}_{part}.txt", len(names), list_file, who
            )

        keep = np.ones(len(names), dtype=bool)
        if split != "test":
            held_out = np.arange(len(names)) % VAL_EVERY == 0
            keep = held_out if split == "val" else ~held_out
        on_disk = _files_under(flickr)
        present = np.array([name in on_disk for name in names], dtype=bool)
        self.skipped = [names[k] for k in np.flatnonzero(keep & ~present)]
        keep &= present
        if not keep.any():
            raise FileNotFoundError(
                f"{who}: none of the {len(self.skipped)} images of split {split!r} (listed in "
                f"{list_file}) is under {flickr}, e.g. {flickr / self.skipped[0]}; expected the "
                f"layout {_NUSWIDE_LAYOUT}"
            )
        if self.skipped:
            warnings.warn(
                f"{who}: skipped {len(self.skipped)} of {len(self.skipped) + int(keep.sum())} "
                f"images of split {split!r} that are not under {flickr} (see .skipped)",
                UserWarning,
                stacklevel=2,
            )
        self.image_names = [name for name, k in zip(names, keep, strict=True) if k]
        self.labels = torch.from_numpy(labels[keep])
        self._set_images(
            flickr,
            self.image_names,
            None,
            *pack_boxes([], [], [0] * len(self.image_names)),
        )

    def __repr__(self) -> str:
        return (
            f"NUSWIDEDataset(root={str(self.root)!r}, split={self.split!r}, len={len(self)}, "
            f"skipped={len(self.skipped)})"
        )


def _read_lines(path: Path, who: str, what: str) -> list[str]:
    """The non-empty stripped lines of a text file; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{who}: {path} not found; expected the layout {_NUSWIDE_LAYOUT}")
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{who}: {path} is empty; expected {what}, one a line")
    return lines


def _read_labels(path: Path, count: int, list_file: Path, who: str) -> np.ndarray:
    """``Tensor[count]``-like float32 0/1 array of one ``Labels_<concept>_<part>.txt``."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{who}: labels file {path} not found; expected the layout {_NUSWIDE_LAYOUT}"
        )
    values = path.read_text(errors="replace").split()
    if len(values) != count:
        raise ValueError(
            f"{who}: labels file {path} has {len(values)} labels, but {list_file} lists "
            f"{count} images; expected one 0/1 a line, aligned with the list"
        )
    array = np.array(values)
    bad = np.flatnonzero((array != "0") & (array != "1"))
    if len(bad):
        raise ValueError(
            f"{who}: labels file {path}: label {bad[0] + 1} is {values[bad[0]]!r}, expected 0 or 1"
        )
    return (array == "1").astype(np.float32)


def _files_under(folder: Path) -> set[str]:
    """Every file under ``folder`` as a ``/``-separated path relative to it (one tree walk)."""
    found: set[str] = set()
    for directory, _, files in os.walk(folder, followlinks=True):
        relative = os.path.relpath(directory, folder).replace(os.sep, "/")
        prefix = "" if relative == "." else relative + "/"
        found.update(prefix + name for name in files)
    return found
