"""Labels and scores of images from a trained checkpoint.

    python -m models.predict --checkpoint runs/train/best.pt photo1.jpg photo2.png \\
        [--threshold 0.5] [--top-k 5] [--device cpu]

For each image: the classes scored at or above ``--threshold`` (or, when none is, the best one),
then the ``--top-k`` highest scores. The image is resized to the checkpoint's ``image_size``
as in training. Exit status 2, with a message on stderr, for a missing, truncated or foreign
checkpoint or an unreadable image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_checkpoint
from .registry import build_model
from .train import Collate

PROG = "models.predict"


class PredictError(Exception):
    """A user error: reported on stderr without a traceback."""


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, list[str], int]:
    """The model of a trainer checkpoint, in eval mode, with its class names and image size.

    The backbone is built without pretrained weights (the checkpoint holds every weight).

    Raises:
        CheckpointError: a missing, truncated or foreign checkpoint, or one whose weights do not
            fit the model it names.
    """
    from .backbones import build_backbone

    state = load_checkpoint(path)
    args = argparse.Namespace(**state["args"])
    class_names = list(state["class_names"])
    args.class_names = class_names  # as the trainer gives them to builders
    try:
        backbone = build_backbone(args.backbone, pretrained=False)
        model = build_model(state["model_name"], len(class_names), backbone, args)
    except (KeyError, ValueError, TypeError) as error:
        message = error.args[0] if error.args else error
        raise CheckpointError(
            f"checkpoint {state['path']}: cannot build its model {state['model_name']!r} on "
            f"{args.backbone!r}: {message}"
        ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {state['path']}: its weights do not fit model {state['model_name']!r} "
            f"({str(error).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), class_names, int(args.image_size)


def read_image(path: str | Path) -> Tensor:
    """``Tensor[3, H, W]`` uint8 RGB of an image file (any format Pillow reads).

    Raises:
        PredictError: the file is missing or not an image.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise PredictError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise PredictError(f"image {path} cannot be read ({error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_batch(images: list[Tensor], image_size: int) -> Tensor:
    """uint8 ``Tensor[3, H, W]`` images (any sizes, e.g. from :func:`read_image`) as the model
    input the trainer makes of them: float ``Tensor[N, 3, S, S]`` in [0, 1], S = ``image_size``."""
    samples = [
        {
            "image": image,
            "labels": torch.zeros(0),
            "boxes": torch.zeros(0, 4),
            "box_classes": torch.zeros(0, dtype=torch.int64),
            "index": i,
        }
        for i, image in enumerate(images)
    ]
    return Collate(image_size)(samples)["images"]


@torch.no_grad()
def predict(model: nn.Module, images: list[Tensor], image_size: int) -> Tensor:
    """Scores ``Tensor[len(images), C]`` in [0, 1] of uint8 ``Tensor[3, H, W]`` images."""
    device = next(model.parameters()).device
    return model.scores(model(image_batch(images, image_size).to(device))).float().cpu()


def format_prediction(
    name: str, scores: Tensor, class_names: list[str], threshold: float, top_k: int
) -> str:
    """Lines for one image: labels at or above ``threshold`` and the ``top_k`` best scores."""
    order = torch.argsort(scores, descending=True, stable=True)
    labels = [class_names[i] for i in order.tolist() if scores[i] >= threshold]
    if not labels:
        labels = [f"{class_names[int(order[0])]} (best, below {threshold:g})"]
    top = ", ".join(f"{class_names[i]} {scores[i]:.3f}" for i in order[:top_k].tolist())
    return f"{name}\n  labels: {', '.join(labels)}\n  top-{min(top_k, len(order))}: {top}"


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a models.train checkpoint")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    try:
        args = parser.parse_args(argv)
        if args.top_k < 1:
            raise PredictError(f"--top-k must be >= 1, got {args.top_k}")
        try:
            model, class_names, image_size = load_model(args.checkpoint, args.device)
        except CheckpointError as error:
            raise PredictError(f"--checkpoint: {error}") from None
        images = [read_image(path) for path in args.images]
        scores = predict(model, images, image_size)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    except PredictError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    for path, row in zip(args.images, scores, strict=True):
        print(format_prediction(path, row, class_names, args.threshold, args.top_k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
