"""Multi-label datasets: the offline scenes benchmark and loaders for VOC 2007, COCO and NUS-WIDE.

Every dataset here is a ``torch.utils.data.Dataset`` with the same sample format, so the trainer,
the metrics and the models never ask which one they were given. ``dataset[i]`` is a dict:

- ``"image"``: ``Tensor[3, H, W]`` uint8, RGB (sizes may differ between images of real datasets);
- ``"labels"``: ``Tensor[C]`` float32, 1 for a class present, 0 absent, -1 "ignore" (a class whose
  only objects are VOC "difficult" ones, with ``difficult="ignore"``), which the metrics skip;
- ``"boxes"``: ``Tensor[N, 4]`` float32, the objects' boxes (x1, y1, x2, y2) in pixels of
  ``"image"``; ``N = 0`` where a dataset has no boxes (NUS-WIDE);
- ``"box_classes"``: ``Tensor[N]`` int64, each box's class index;
- ``"index"``: int, ``i`` itself (so predictions can be traced back to the image).

and the dataset has the attributes ``classes`` (``list[str]``, the class names in label order),
``num_classes``, ``labels`` (``Tensor[len, C]`` float32, every sample's ``"labels"`` without
reading an image) and ``objects`` (a dict of three ``Tensor[M]``, one entry per object of the
split, for recall by object size: ``"image"`` int64 sample index, ``"class"`` int64,
``"area_fraction"`` float32 box area / image area; empty tensors where a dataset has no boxes).
``transform``, when given, is applied to the whole sample dict and returns it.

:func:`open_dataset` maps the trainer's ``--data`` argument to a dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")

# "--data NAME[:PATH]" -> (module, class). Imported lazily: a user training on scenes needs no
# pycocotools import, and each loader's heavy imports stay in its own module.
_DATASETS = {
    "scenes": ("models.data.scenes", "ScenesDataset"),
    "voc2007": ("models.data.voc", "VOC2007Dataset"),
    "coco": ("models.data.coco", "COCODataset"),
    "nuswide": ("models.data.nuswide", "NUSWIDEDataset"),
}


def dataset_names() -> list[str]:
    """The names :func:`open_dataset` accepts before the ``:PATH``."""
    return sorted(_DATASETS)


def open_dataset(spec: str, split: str, **options: Any):
    """The dataset named by a trainer ``--data`` argument, for one split.

    Args:
        spec: ``"scenes"`` (generated on first use, cached; ``"scenes:DIR"`` caches under DIR),
            ``"voc2007:PATH"`` (the VOCdevkit/VOC2007 folder), ``"coco:PATH"`` (a folder with
            ``annotations/`` and the image folders) or ``"nuswide:PATH"``.
        split: ``"train"``, ``"val"`` or ``"test"``; each loader documents what they map to.
        options: passed to the dataset's constructor (e.g. ``difficult=`` for VOC).

    Raises:
        ValueError: an unknown dataset name or split, or a missing PATH where one is needed.
        FileNotFoundError: PATH does not exist (but for scenes, whose cache folder is made).
    """
    import importlib

    name, _, path = spec.partition(":")
    if name not in _DATASETS:
        raise ValueError(
            f"--data: unknown dataset {name!r}; expected one of {', '.join(dataset_names())}, "
            "optionally followed by :PATH"
        )
    if split not in SPLITS:
        raise ValueError(f"open_dataset: split must be one of {SPLITS}, got {split!r}")
    if name != "scenes" and not path:
        raise ValueError(f"--data {name}: needs the dataset's folder, as {name}:PATH")
    if path and name != "scenes" and not Path(path).exists():  # scenes:DIR is created
        raise FileNotFoundError(f"--data {spec}: {path} does not exist")
    module_name, class_name = _DATASETS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(path or None, split, **options)
