"""CADM: class-aware disentangled maps with a label-correlation embedding loss.

Registered as ``--model cadm``. From the backbone's features ``X`` (``Tensor[B, D, h, w]``):

- ``y_fcls = W^T GMP(X)``: global max-pooling, then a linear layer without bias (``Tensor[B, C]``);
- ``A = theta^T X``: the class-aware disentangled maps, a 1x1 convolution ``D -> C`` without bias
  (``Tensor[B, C, h, w]``, one map per class);
- ``y_scls = GMP_c(A)``: a depth-wise (per-class) global max-pooling of the maps (``Tensor[B, C]``);
- the prediction's logits are ``(y_fcls + y_scls) / 2``; :meth:`CADM.scores` is their sigmoid.

The loss is the masked binary cross-entropy of the prediction (labels -1 left out) plus
``lambda`` (0.5, the paper's) times the label-correlation embedding loss: a two-layer MLP embeds
each class map ``A_c``. Since ``h * w`` depends on the image size, each map is first resampled to
a fixed ``grid x grid`` (7 x 7 by default) by :func:`mlkernels.ops.roi_align` with one box
covering the whole map (``aligned=True``, 2 x 2 samples per bin: a bilinear adaptive average
pool, the same function at every image size), then flattened and embedded. For every class with
a positive image in the batch, the positives' embeddings are pulled to their mean (squared
distance) and the negatives' pushed at least ``margin`` (1) away from it (squared hinge
``max(0, margin - d)^2``); the per-class terms are averaged over the classes that have a
positive. Labels -1 are neither positive nor negative.

``--share-classifier`` uses the linear layer's weights as ``theta`` (CAM-style: one classifier
read before and after the spatial max); by default they are two separate layers.

:func:`save_cadm_maps` draws images with their highest-scoring class maps overlaid;
``python -m models.cadm --checkpoint CKPT IMAGE... --out maps.png`` does it for a trained model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlkernels

from .baseline import masked_bce_with_logits
from .registry import register_model

__all__ = ["CADM", "build_cadm", "correlation_embedding_loss", "save_cadm_maps"]


def correlation_embedding_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """The label-correlation embedding loss of CADM over one batch.

    For each class ``c`` with at least one positive image, ``m_c`` is the mean embedding of its
    positives; the class's term is the mean of ``d^2`` over its positives plus the mean of
    ``max(0, margin - d)^2`` over its negatives, with ``d = ||e_{b,c} - m_c||``.

    Args:
        embeddings: ``Tensor[B, C, E]`` float, the embedding of each image's map of each class.
        labels: ``Tensor[B, C]``, 1 present, 0 absent, -1 ignore (neither pulled nor pushed).
        margin: the distance the negatives are pushed to, > 0.

    Returns:
        ``Tensor[]`` float32: the mean of the class terms over the classes with a positive (0,
        with a gradient, when no class has one).
    """
    if embeddings.dim() != 3 or labels.shape != embeddings.shape[:2]:
        raise ValueError(
            f"correlation_embedding_loss: embeddings must be Tensor[B, C, E] and labels "
            f"Tensor[B, C] of the same B and C, got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not margin > 0:
        raise ValueError(f"correlation_embedding_loss: margin must be > 0, got {margin}")
    embeddings = embeddings.float()
    positive = (labels == 1).to(embeddings.dtype)  # [B, C]
    negative = (labels == 0).to(embeddings.dtype)
    count = positive.sum(dim=0)  # [C]
    centers = (positive.unsqueeze(-1) * embeddings).sum(dim=0) / count.clamp(min=1).unsqueeze(-1)
    squared = (embeddings - centers.unsqueeze(0)).square().sum(dim=-1)  # [B, C]
    distance = (squared + 1e-12).sqrt()  # finite gradient where an embedding is its own center
    pull = (positive * squared).sum(dim=0) / count.clamp(min=1)
    push = (negative * F.relu(margin - distance).square()).sum(dim=0)
    push = push / negative.sum(dim=0).clamp(min=1)
    present = (count > 0).to(embeddings.dtype)
    return ((pull + push) * present).sum() / present.sum().clamp(min=1)


class CADM(nn.Module):
    """Backbone, class-aware disentangled maps, two max-pooled heads averaged (see the module).

    Args:
        num_classes: C, >= 1.
        backbone: a ``models.backbones`` backbone (``channels`` attribute; ``forward(images
            Tensor[B, 3, H, W] in [0, 1]) -> Tensor[B, D, h, w]``).
        corr_weight: lambda, the weight of the label-correlation embedding loss (>= 0; 0 turns
            it off).
        margin: the negatives' margin in the embedding loss (> 0).
        embed_hidden: the hidden width of the two-layer embedding MLP.
        embed_dim: the embedding size E.
        grid: each class map is resampled to ``grid x grid`` before the MLP.
        share_classifier: use the linear head's weights as ``theta`` (no separate 1x1 conv).

    ``forward`` returns a dict: ``"logits"`` Tensor[B, C] (the prediction), ``"fcls"`` and
    ``"scls"`` Tensor[B, C] (the two heads), ``"maps"`` Tensor[B, C, h, w] (A) and
    ``"embeddings"`` Tensor[B, C, E].
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        *,
        corr_weight: float = 0.5,
        margin: float = 1.0,
        embed_hidden: int = 512,
        embed_dim: int = 256,
        grid: int = 7,
        share_classifier: bool = False,
    ) -> None:
        super().__init__()
        checks = {
            "num_classes": (num_classes, num_classes >= 1, ">= 1"),
            "corr_weight": (corr_weight, corr_weight >= 0, ">= 0"),
            "margin": (margin, margin > 0, "> 0"),
            "embed_hidden": (embed_hidden, embed_hidden >= 1, ">= 1"),
            "embed_dim": (embed_dim, embed_dim >= 1, ">= 1"),
            "grid": (grid, grid >= 1, ">= 1"),
        }
        for name, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"CADM: {name} must be {expected}, got {value!r}")
        channels = getattr(backbone, "channels", None)
        if not isinstance(backbone, nn.Module) or not isinstance(channels, int) or channels < 1:
            raise TypeError(
                f"CADM: backbone must be an nn.Module with an int 'channels' attribute (a "
                f"models.backbones backbone), got {type(backbone).__name__} with channels="
                f"{channels!r}"
            )
        self.num_classes = num_classes
        self.corr_weight = float(corr_weight)
        self.margin = float(margin)
        self.grid = int(grid)
        self.share_classifier = bool(share_classifier)
        self.backbone = backbone
        self.classifier = nn.Linear(channels, num_classes, bias=False)  # W: y_fcls
        self.theta = None if share_classifier else nn.Conv2d(channels, num_classes, 1, bias=False)
        self.embed = nn.Sequential(
            nn.Linear(grid * grid, embed_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(embed_hidden, embed_dim),
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, corr_weight={self.corr_weight}, "
            f"margin={self.margin}, grid={self.grid}, share_classifier={self.share_classifier}"
        )

    def class_maps(self, features: Tensor) -> Tensor:
        """``A = theta^T X``: ``features`` Tensor[B, D, h, w] -> Tensor[B, C, h, w]."""
        if self.theta is None:
            return F.conv2d(features, self.classifier.weight[:, :, None, None])
        return self.theta(features)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images`` Tensor[B, 3, H, W] float in [0, 1] -> the dict of outputs (class doc)."""
        features = self.backbone(images)  # [B, D, h, w]
        batch, _, height, width = features.shape
        fcls = self.classifier(features.amax(dim=(2, 3)))  # [B, C]
        maps = self.class_maps(features)  # [B, C, h, w]
        scls = maps.amax(dim=(2, 3))
        # One box per image covering the whole map: a fixed grid x grid of every class map.
        whole = maps.new_tensor([0.0, 0.0, float(width), float(height)]).expand(batch, 4)
        rois = torch.cat(
            [torch.arange(batch, dtype=maps.dtype, device=maps.device)[:, None], whole], 1
        )
        pooled = mlkernels.ops.roi_align(
            maps, rois, output_size=self.grid, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )  # [B, C, grid, grid]
        embeddings = self.embed(pooled.flatten(2))  # [B, C, E]
        return {
            "logits": (fcls + scls) / 2,
            "fcls": fcls,
            "scls": scls,
            "maps": maps,
            "embeddings": embeddings,
        }

    def loss(self, outputs: dict[str, Tensor], batch: dict) -> Tensor:
        """Masked BCE of the prediction plus ``corr_weight`` x the embedding loss: Tensor[]."""
        labels = batch["labels"]
        bce = masked_bce_with_logits(outputs["logits"], labels)
        if self.corr_weight == 0:
            return bce
        correlation = correlation_embedding_loss(outputs["embeddings"], labels, self.margin)
        return bce + self.corr_weight * correlation

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """Sigmoid of the prediction's logits: Tensor[B, C] in [0, 1], float32."""
        return torch.sigmoid(outputs["logits"].float())


@torch.no_grad()
def save_cadm_maps(
    model: CADM,
    images: Tensor,
    labels: Tensor | None,
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    top_k: int = 3,
    max_images: int = 4,
) -> Path:
    """Write a PNG: each image, then its ``top_k`` highest-scoring class maps overlaid on it.

    Each map ``A_c`` is upsampled (bilinear) to the image, scaled to [0, 1] per map and drawn as
    a heat map over the image; its title gives the class, the score and, when ``labels`` is
    given, whether the class is present (``+``), absent (``-``) or ignored (``?``).

    Args:
        model: a :class:`CADM` (run in eval mode here; its mode is restored).
        images: ``Tensor[B, 3, H, W]`` float in [0, 1].
        labels: ``Tensor[B, C]`` with 1 / 0 / -1, or None.
        path: the PNG to write (its folder is created).
        class_names: C names (default ``class 0``, ``class 1``, ...).
        top_k: maps per image, 1 <= top_k <= C.
        max_images: at most this many of the images are drawn (the first ones).

    Returns:
        ``path`` as a Path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"save_cadm_maps: images must be Tensor[B, 3, H, W], got {tuple(images.shape)}"
        )
    num_classes = model.num_classes
    if labels is not None and tuple(labels.shape) != (images.shape[0], num_classes):
        raise ValueError(
            f"save_cadm_maps: labels must be Tensor[{images.shape[0]}, {num_classes}], got "
            f"{tuple(labels.shape)}"
        )
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"save_cadm_maps: top_k must be in [1, {num_classes}], got {top_k}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"save_cadm_maps: class_names must have {num_classes} names, got {len(class_names)}"
        )
    names = (
        list(class_names) if class_names is not None else [f"class {c}" for c in range(num_classes)]
    )
    count = min(images.shape[0], max(1, max_images))
    images = images[:count]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        outputs = model(images.to(device))
    finally:
        model.train(was_training)
    scores = model.scores(outputs).cpu()
    maps = F.interpolate(
        outputs["maps"].float(), size=images.shape[2:], mode="bilinear", align_corners=False
    ).cpu()
    figure, axes = plt.subplots(
        count, top_k + 1, figsize=(2.2 * (top_k + 1), 2.3 * count), squeeze=False
    )
    for row in range(count):
        picture = images[row].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title("image", fontsize=8)
        for column, c in enumerate(scores[row].topk(top_k).indices.tolist(), start=1):
            heat = maps[row, c]
            heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
            axes[row, column].imshow(picture)
            axes[row, column].imshow(heat.numpy(), cmap="jet", alpha=0.5)
            mark = ""
            if labels is not None:
                mark = {1: " +", 0: " -"}.get(int(labels[row, c]), " ?")
            axes[row, column].set_title(f"{names[c]} {scores[row, c]:.2f}{mark}", fontsize=8)
        for axis in axes[row]:
            axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CADM's own options (paper defaults; the widths shrink for small machines)."""
    group = parser.add_argument_group("cadm model")
    group.add_argument(
        "--corr-weight", type=float, default=0.5, help="lambda of the embedding loss (0: off)"
    )
    group.add_argument(
        "--corr-margin", type=float, default=1.0, help="margin the negatives are pushed to"
    )
    group.add_argument("--embed-hidden", type=int, default=512, help="hidden width of the MLP")
    group.add_argument("--embed-dim", type=int, default=256, help="embedding size of a class map")
    group.add_argument(
        "--map-grid", type=int, default=7, help="class maps resampled to GRID x GRID for the MLP"
    )
    group.add_argument(
        "--share-classifier",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="theta = the linear head's weights (no separate 1x1 convolution)",
    )


def build_cadm(num_classes: int, backbone: nn.Module, args: argparse.Namespace) -> CADM:
    """The registry builder of :class:`CADM`."""
    return CADM(
        num_classes,
        backbone,
        corr_weight=getattr(args, "corr_weight", 0.5),
        margin=getattr(args, "corr_margin", 1.0),
        embed_hidden=getattr(args, "embed_hidden", 512),
        embed_dim=getattr(args, "embed_dim", 256),
        grid=getattr(args, "map_grid", 7),
        share_classifier=getattr(args, "share_classifier", False),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m models.cadm --checkpoint CKPT IMAGE... --out maps.png [--top-k 3]``."""
    from .checkpoint import CheckpointError
    from .predict import PredictError, image_batch, load_model, read_image

    parser = argparse.ArgumentParser(
        prog="models.cadm", description="Draw the class-aware disentangled maps of a CADM model."
    )
    parser.add_argument("--checkpoint", required=True, help="a trainer checkpoint of --model cadm")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", default="cadm_maps.png", help="the PNG to write")
    parser.add_argument("--top-k", type=int, default=3, help="maps per image")
    args = parser.parse_args(argv)
    try:
        model, class_names, image_size = load_model(args.checkpoint)
        if not isinstance(model, CADM):
            raise PredictError(
                f"checkpoint {args.checkpoint} holds a {type(model).__name__}, not a CADM model"
            )
        images = image_batch([read_image(image) for image in args.images], image_size)
        top_k = min(args.top_k, len(class_names))
        out = save_cadm_maps(
            model,
            images,
            None,
            args.out,
            class_names=class_names,
            top_k=top_k,
            max_images=len(args.images),
        )
    except (CheckpointError, PredictError, ValueError) as error:
        print(f"models.cadm: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    # Run as ``python -m models.cadm``: this file is then ``__main__``, a second copy of the
    # module; the importable ``models.cadm`` registers the model and defines the CADM class.
    from models.cadm import main as module_main

    sys.exit(module_main())
else:
    register_model("cadm", add_arguments)(build_cadm)
