"""The multi-label baseline: backbone, global average pooling, a linear head, binary cross-entropy.

This is the papers' "ResNet baseline" (ML-GCN, ASL) or "Multi-CNN": one independent sigmoid per
class on pooled backbone features, with no label dependencies modelled. Registered as
``--model baseline``; its options: ``--dropout P`` before the head, ``--freeze-backbone`` (train
the head only; the backbone runs in eval mode under ``no_grad``, a linear probe of its features).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model


def masked_bce_with_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy averaged over the labels that are not "ignore".

    Args:
        logits: ``Tensor[B, C]`` float.
        labels: ``Tensor[B, C]`` float, 1 present, 0 absent, -1 ignore (left out of the mean).

    Returns:
        ``Tensor[]``: the mean over the known labels (0, with a gradient, when none is known).
    """
    if logits.shape != labels.shape:
        raise ValueError(
            f"masked_bce_with_logits: logits and labels must have the same shape, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    known = (labels >= 0).to(logits.dtype)
    losses = F.binary_cross_entropy_with_logits(
        logits.float(), labels.clamp(min=0).float(), reduction="none"
    )
    return (losses * known).sum() / known.sum().clamp(min=1)


class Baseline(nn.Module):
    """``backbone -> global average pool -> dropout -> Linear(channels, num_classes)``.

    Args:
        num_classes: C.
        backbone: a ``models.backbones`` backbone (``channels`` attribute; ``forward(images
            Tensor[B, 3, H, W] in [0, 1]) -> Tensor[B, channels, h, w]``).
        dropout: dropout probability before the head.
        freeze_backbone: train the head only; the backbone stays in eval mode (BatchNorm uses
            its running statistics) and runs under ``no_grad``.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        *,
        dropout: float = 0.0,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"Baseline: num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.channels, num_classes)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> Baseline:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """``images`` Tensor[B, 3, H, W] float in [0, 1] -> logits Tensor[B, C]."""
        if self.freeze_backbone:
            with torch.no_grad():
                features = self.backbone(images)
        else:
            features = self.backbone(images)
        pooled = features.mean(dim=(2, 3))
        return self.head(self.dropout(pooled))

    def loss(self, outputs: Tensor, batch: dict) -> Tensor:
        """Masked BCE of the logits ``outputs`` Tensor[B, C] against ``batch["labels"]``."""
        return masked_bce_with_logits(outputs, batch["labels"])

    def scores(self, outputs: Tensor) -> Tensor:
        """Sigmoid of the logits: Tensor[B, C] in [0, 1], float32."""
        return torch.sigmoid(outputs.float())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The baseline's own options."""
    group = parser.add_argument_group("baseline model")
    group.add_argument("--dropout", type=float, default=0.0, help="dropout before the head")
    group.add_argument(
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train the head only (a linear probe of the backbone's features)",
    )


@register_model("baseline", add_arguments)
def build_baseline(num_classes: int, backbone: nn.Module, args: argparse.Namespace) -> Baseline:
    """The registry builder of :class:`Baseline`."""
    return Baseline(
        num_classes,
        backbone,
        dropout=getattr(args, "dropout", 0.0),
        freeze_backbone=getattr(args, "freeze_backbone", False),
    )
