"""RLSD: Regional Latent Semantic Dependencies (Zhang et al., IEEE TMM 2018), registered as
``--model rlsd``.

Structure (``B`` images, ``C`` classes, ``R`` regions per image, ``T`` decoding steps)::

    backbone -> features X Tensor[B, D, h, w]
    localization: mlkernels.nn.ProposalLayer on X (k = len(sizes) x len(ratios) = 12 anchors per
        cell, 3x3 conv + ReLU + 1x1 conv (4 + 1) k, log-space box regression) and ops.propose:
        training: the M/2 highest-objectness proposals after NMS are the regions;
        test: the top M after NMS plus the whole image.
    regions: mlkernels.ops.roi_align(ReLU(1x1 conv X), boxes) 7 x 7, with gradients into the
        boxes and through their decoding into the localization head
        -> two fully-connected layers with dropout -> v Tensor[B * R, F]
    per-region LSTM: x_0 = W_ev v (size E), then at each step t >= 1 the embedding of step t-1's
        argmax label (a one-hot "latent label"); p_t = softmax(W_o h_t) over C labels + END;
        a region's steps after it chose END count no more
    prediction: the max over regions and steps of p_t (its first C entries): Tensor[B, C].

The loss is the squared error between the prediction and the L1-normalized label vector (labels
-1 left out), plus ``objectness_weight`` x a binary cross-entropy on the localization head's
objectness. Multi-label datasets have no boxes, so by default that term follows the paper's
recipe without them: per image, of M anchors the M/2 with the highest objectness are positives
and the M/2 lowest negatives (self-training the ranking the regions are taken from). With
``box_supervision`` (the paper's upper bound RLSD+ft-RPN) the objects' boxes are used instead:
ground-truth regions are made by hierarchical clustering of the object-box centers (single
linkage, clusters cut at ``cluster_distance`` x the image side; a region is its cluster's boxes'
union); anchors with IoU > 0.7 to a region (and each region's best anchor) are positives, under
0.3 negatives, M sampled per image (at most half positive) as torchvision's RPN samples them,
with a smooth-L1 loss on the positives' box regression.

``variant="global"`` is the CNN+LSTM variant: the whole image is the only region and there is no
localization layer. It pre-trains the LSTM: ``--rlsd-init CKPT`` starts a model from the tensors
of a trained RLSD checkpoint whose names and shapes match (the backbone, the region layers and
the LSTM of a global run).

Widths: the paper's fully-connected layers have 4096 units on VGG-16's 512 channels; here the
backbone's features first go through a 1x1 convolution to ``region_channels`` (256), and
``--region-fc``, ``--regions`` shrink the region layers for small machines.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlkernels
import mlkernels.ops
from mlkernels.nn import ProposalLayer
from mlkernels.ops import ProposeConfig

from .registry import register_model

__all__ = [
    "RLSD",
    "LOSSES",
    "VARIANTS",
    "add_arguments",
    "build_rlsd",
    "cluster_regions",
    "masked_bce",
    "match_anchors",
    "normalized_squared_loss",
]

VARIANTS = ("regional", "global")
LOSSES = ("squared", "bce")

# torchvision's RPN thresholds, which RLSD+ft-RPN uses for its ground-truth regions.
POSITIVE_IOU = 0.7
NEGATIVE_IOU = 0.3


def _check(name: str, ok: bool, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"RLSD: {name} must be {expected}, got {value!r}")


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def normalized_squared_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """RLSD's classification loss: ``sum_c (s_c - y_c / |y|_1)^2``, averaged over the batch.

    Args:
        scores: ``Tensor[B, C]`` in [0, 1], the max-pooled label probabilities.
        labels: ``Tensor[B, C]``, 1 present, 0 absent, -1 ignore (left out of the sum and of the
            normalization).

    Returns:
        ``Tensor[]`` float32 (0 for an empty batch).
    """
    if scores.dim() != 2 or labels.shape != scores.shape:
        raise ValueError(
            f"normalized_squared_loss: scores and labels must be Tensor[B, C] of one shape, got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    known = (labels != -1).to(torch.float32)
    positive = (labels == 1).to(torch.float32)
    target = positive / positive.sum(dim=1, keepdim=True).clamp(min=1)
    squared = (scores.float() - target).square() * known
    return squared.sum(dim=1).mean() if scores.shape[0] else squared.sum()


def masked_bce(scores: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy of probabilities ``scores`` Tensor[B, C] against ``labels`` (-1 left
    out), the mean over the known entries; probabilities clamped to [1e-6, 1 - 1e-6]."""
    known = labels != -1
    probabilities = scores.float().clamp(1e-6, 1 - 1e-6)
    terms = F.binary_cross_entropy(probabilities, (labels == 1).float(), reduction="none")
    return (terms * known).sum() / known.sum().clamp(min=1)


def cluster_regions(boxes: Tensor, distance: float) -> Tensor:
    """Ground-truth regions of one image for RLSD+ft-RPN: the object boxes grouped by single-link
    hierarchical clustering of their centers (scipy), clusters cut at ``distance`` pixels; each
    region is the union box of its cluster.

    Args:
        boxes: ``Tensor[N, 4]`` (x1, y1, x2, y2) object boxes in pixels.
        distance: the largest center distance that joins two clusters, > 0.

    Returns:
        ``Tensor[G, 4]`` in the boxes' dtype, G <= N, ordered by cluster label (G = 0 for N = 0).
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"cluster_regions: boxes must be Tensor[N, 4], got {tuple(boxes.shape)}")
    _check("cluster_distance", distance > 0, "> 0", distance)
    if boxes.shape[0] <= 1:
        return boxes.clone()
    from scipy.cluster.hierarchy import fclusterdata

    centers = ((boxes[:, :2] + boxes[:, 2:]) / 2).detach().cpu().double().numpy()
    labels = torch.as_tensor(
        fclusterdata(centers, t=distance, criterion="distance", method="single")
    ).to(boxes.device)
    regions = []
    for label in torch.unique(labels).tolist():
        members = boxes[labels == label]
        regions.append(torch.cat([members[:, :2].amin(dim=0), members[:, 2:].amax(dim=0)]))
    return torch.stack(regions)


def match_anchors(anchors: Tensor, regions: Tensor) -> tuple[Tensor, Tensor]:
    """torchvision RPN's matching of anchors to ground-truth regions.

    Returns:
        ``labels Tensor[A]`` float (1 positive: IoU > 0.7 with a region, or a region's best
        anchor; 0 negative: IoU < 0.3 with every region; -1 neither) and ``matched Tensor[A]``
        int64 (the index of each anchor's best region; 0 where there is no region).
    """
    count = anchors.shape[0]
    if regions.shape[0] == 0:
        zeros = torch.zeros(count, dtype=torch.int64, device=anchors.device)
        return anchors.new_zeros(count), zeros
    iou = mlkernels.ops.box_iou(anchors, regions.to(anchors.dtype)).nan_to_num(0.0)  # [A, G]
    best, matched = iou.max(dim=1)
    labels = torch.full_like(best, -1.0)
    labels[best < NEGATIVE_IOU] = 0.0
    labels[best > POSITIVE_IOU] = 1.0
    # Each region's best anchors (ties included) are positives even below 0.7, so that every
    # region is learned ("low-quality matches", as torchvision allows them).
    best_per_region = iou.max(dim=0, keepdim=True).values
    labels[((iou == best_per_region) & (best_per_region > 0)).any(dim=1)] = 1.0
    return labels, matched


class RLSD(nn.Module):
    """Localization layer, RoI features, a per-region LSTM, max-pooled (see the module doc).

    Args:
        num_classes: C, >= 1.
        backbone: a ``models.backbones`` backbone (``channels`` and ``stride`` attributes).
        image_size: the side of the (square) training images in pixels; the anchors' sizes are
            ``anchor_fractions`` x this.
        variant: "regional" (RLSD) or "global" (CNN+LSTM on the whole image).
        regions: M: proposals kept after NMS at test time (training takes the top M/2 as
            regions), and anchors sampled per image for the objectness loss.
        anchor_fractions, aspect_ratios: the anchors (12 = 4 x 3 per cell by default).
        rpn_hidden: channels of the localization layer's 3x3 conv.
        region_channels: the 1x1 conv's channels before roi_align.
        pool_size: roi_align's output side (7).
        region_fc: width of the two fully-connected region layers (the paper's 4096).
        dropout: after each of them.
        embed_dim: E, the size of the region embedding x_0 and of the label embeddings (64).
        hidden: the LSTM's hidden size (512).
        steps: T, the decoding steps per region.
        objectness_weight: the weight of the localization layer's loss (>= 0).
        classification_loss: "squared" (the paper's, against the L1-normalized label vector) or
            "bce" (binary cross-entropy of the max-pooled probabilities against the labels; an
            ablation).
        box_supervision: RLSD+ft-RPN: train the localization layer on regions clustered from
            the objects' boxes (``batch["boxes"]``).
        cluster_distance: for ``box_supervision``: the cut of the clustering, in image sides.

    ``forward(images Tensor[B, 3, H, W])`` returns a dict: ``"scores"`` Tensor[B, C] (the
    prediction), ``"region_scores"`` Tensor[B, R, C], ``"boxes"`` Tensor[B, R, 4] (the regions,
    in pixels), ``"valid"`` Tensor[B, R] bool (rows past an image's proposal count are padding and
    count for nothing), ``"steps"`` Tensor[B, R, T] int64 (each step's argmax label, C = END) and,
    for the regional variant, the localization head's ``"objectness"`` Tensor[B, A], ``"deltas"``
    Tensor[B, A, 4] and ``"anchors"`` Tensor[A, 4].
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        *,
        image_size: int,
        variant: str = "regional",
        regions: int = 256,
        anchor_fractions: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_hidden: int = 256,
        region_channels: int = 256,
        pool_size: int = 7,
        region_fc: int = 4096,
        dropout: float = 0.5,
        embed_dim: int = 64,
        hidden: int = 512,
        steps: int = 5,
        objectness_weight: float = 1.0,
        classification_loss: str = "squared",
        box_supervision: bool = False,
        cluster_distance: float = 0.25,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("num_classes", num_classes, 1),
            ("image_size", image_size, 1),
            ("regions", regions, 2),
            ("rpn_hidden", rpn_hidden, 1),
            ("region_channels", region_channels, 1),
            ("pool_size", pool_size, 1),
            ("region_fc", region_fc, 1),
            ("embed_dim", embed_dim, 1),
            ("hidden", hidden, 1),
            ("steps", steps, 1),
        ):
            _check(name, _is_int(value, minimum), f"an int >= {minimum}", value)
        _check("variant", variant in VARIANTS, f"one of {VARIANTS}", variant)
        _check(
            "classification_loss",
            classification_loss in LOSSES,
            f"one of {LOSSES}",
            classification_loss,
        )
        _check("dropout", 0 <= dropout < 1, "in [0, 1)", dropout)
        _check("objectness_weight", objectness_weight >= 0, ">= 0", objectness_weight)
        _check("cluster_distance", cluster_distance > 0, "> 0", cluster_distance)
        _check(
            "box_supervision",
            not (box_supervision and variant == "global"),
            "False for the global variant (it has no localization layer)",
            box_supervision,
        )
        channels, stride = getattr(backbone, "channels", None), getattr(backbone, "stride", None)
        if (
            not isinstance(backbone, nn.Module)
            or not _is_int(channels, 1)
            or not _is_int(stride, 1)
        ):
            raise TypeError(
                f"RLSD: backbone must be an nn.Module with int 'channels' and 'stride' attributes "
                f"(a models.backbones backbone), got {type(backbone).__name__} with "
                f"channels={channels!r}, stride={stride!r}"
            )
        self.num_classes = num_classes
        self.variant = variant
        self.regions = regions
        self.stride = stride
        self.pool_size = pool_size
        self.steps = steps
        self.objectness_weight = float(objectness_weight)
        self.classification_loss = classification_loss
        self.box_supervision = bool(box_supervision)
        self.cluster_distance = float(cluster_distance) * image_size
        self.backbone = backbone
        self.localization = None
        if variant == "regional":
            sizes = [fraction * image_size for fraction in anchor_fractions]
            self.localization = ProposalLayer(
                channels, sizes, aspect_ratios, stride, hidden=rpn_hidden, post_nms_top_n=regions
            )
            # Training takes the M/2 best proposals; the test keeps M and adds the whole image.
            self.train_config = ProposeConfig.make(
                self.localization.config, {"post_nms_top_n": max(1, regions // 2)}
            )
            self.test_config = ProposeConfig.make(
                self.localization.config, {"append_whole_image": True}
            )
        self.reduce = nn.Sequential(nn.Conv2d(channels, region_channels, 1), nn.ReLU(inplace=True))
        self.region_layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(region_channels * pool_size * pool_size, region_fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(region_fc, region_fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.region_embedding = nn.Linear(region_fc, embed_dim)  # W_ev: x_0 = W_ev v
        self.label_embedding = nn.Embedding(num_classes + 1, embed_dim)  # C labels + END
        self.lstm = nn.LSTMCell(embed_dim, hidden)
        self.classifier = nn.Linear(hidden, num_classes + 1)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, variant={self.variant!r}, regions={self.regions}, "
            f"steps={self.steps}, objectness_weight={self.objectness_weight}, "
            f"classification_loss={self.classification_loss!r}, "
            f"box_supervision={self.box_supervision}"
        )

    def _regions(self, features: Tensor, images: Tensor) -> tuple[Tensor, Tensor, dict]:
        """The regions' boxes ``Tensor[B, R, 4]``, their validity ``Tensor[B, R]`` and the
        localization head's raw outputs (for the loss)."""
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        if self.localization is None:
            whole = features.new_tensor([0.0, 0.0, float(width), float(height)])
            boxes = whole.expand(batch, 1, 4)
            valid = torch.ones(batch, 1, dtype=torch.bool, device=features.device)
            return boxes, valid, {}
        config = self.train_config if self.training else self.test_config
        proposals = self.localization(features, [(height, width)] * batch, config)
        rows = torch.arange(proposals.boxes.shape[1], device=features.device)
        valid = rows[None, :] < proposals.counts[:, None]
        raw = {
            "objectness": proposals.objectness,
            "deltas": proposals.deltas,
            "anchors": proposals.anchors,
        }
        return proposals.boxes, valid, raw

    def decode(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        """The per-region LSTM: ``regions`` Tensor[N, F] (the fully-connected features v) ->
        ``probabilities`` Tensor[N, T, C + 1] (zero after a region's END) and the argmax labels
        ``Tensor[N, T]`` int64."""
        end = self.num_classes
        inputs = self.region_embedding(regions)
        state = None
        alive = torch.ones(regions.shape[0], 1, dtype=regions.dtype, device=regions.device)
        probabilities, choices = [], []
        for _ in range(self.steps):
            state = self.lstm(inputs, state)
            step = torch.softmax(self.classifier(state[0]), dim=-1)
            choice = step.argmax(dim=-1)
            probabilities.append(step * alive)
            choices.append(choice)
            alive = alive * (choice != end).unsqueeze(1).to(alive.dtype)
            inputs = self.label_embedding(choice)  # the latent label fed to the next step
        return torch.stack(probabilities, dim=1), torch.stack(choices, dim=1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images`` Tensor[B, 3, H, W] float in [0, 1] -> the dict of outputs (class doc)."""
        features = self.backbone(images)  # [B, D, h, w]
        boxes, valid, raw = self._regions(features, images)
        batch, count = boxes.shape[:2]
        image_index = torch.arange(batch, dtype=boxes.dtype, device=boxes.device)
        rois = torch.cat(
            [image_index.repeat_interleave(count).unsqueeze(1), boxes.reshape(-1, 4)], dim=1
        )
        pooled = mlkernels.ops.roi_align(
            self.reduce(features),
            rois,
            output_size=self.pool_size,
            spatial_scale=1.0 / self.stride,
            sampling_ratio=2,
            aligned=True,
        )  # [B * R, region_channels, P, P]
        probabilities, choices = self.decode(self.region_layers(pooled))
        region_scores = probabilities[..., : self.num_classes].amax(dim=1)
        region_scores = region_scores.reshape(batch, count, self.num_classes)
        # Probabilities are >= 0: padding rows at 0 never win the max and get no gradient.
        region_scores = region_scores * valid.unsqueeze(-1).to(region_scores.dtype)
        return {
            "scores": region_scores.amax(dim=1),
            "region_scores": region_scores,
            "boxes": boxes,
            "valid": valid,
            "steps": choices.reshape(batch, count, self.steps),
            **raw,
        }

    def localization_loss(self, outputs: dict[str, Tensor], batch: dict) -> Tensor:
        """The objectness (and, with box supervision, box-regression) loss: Tensor[]."""
        objectness, deltas, anchors = outputs["objectness"], outputs["deltas"], outputs["anchors"]
        images, count = objectness.shape
        if images == 0 or count == 0:
            return objectness.sum() * 0
        half = min(self.regions // 2, count // 2)
        if not self.box_supervision:
            # No boxes: the M/2 highest-objectness anchors are positives, the M/2 lowest negatives.
            order = objectness.detach().argsort(dim=1, descending=True, stable=True)
            chosen = torch.cat([order[:, :half], order[:, count - half :]], dim=1)
            targets = torch.cat(
                [objectness.new_ones(images, half), objectness.new_zeros(images, half)], 1
            )
            return F.binary_cross_entropy_with_logits(objectness.gather(1, chosen), targets)
        logits, targets, box_terms = [], [], []
        for i in range(images):
            regions = cluster_regions(batch["boxes"][i].to(anchors), self.cluster_distance)
            labels, matched = match_anchors(anchors, regions)
            positive = torch.nonzero(labels == 1).squeeze(1)
            negative = torch.nonzero(labels == 0).squeeze(1)
            positive = positive[torch.randperm(positive.numel(), device=positive.device)[:half]]
            room = 2 * half - positive.numel()
            negative = negative[torch.randperm(negative.numel(), device=negative.device)[:room]]
            sampled = torch.cat([positive, negative])
            logits.append(objectness[i, sampled])
            targets.append(labels[sampled])
            if positive.numel():
                goal = mlkernels.ops.encode_boxes(regions[matched[positive]], anchors[positive])
                box_terms.append(
                    F.smooth_l1_loss(deltas[i, positive], goal, beta=1 / 9, reduction="sum")
                )
        logits, targets = torch.cat(logits), torch.cat(targets)
        sampled_count = max(1, logits.numel())
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / sampled_count
        if box_terms:
            loss = loss + torch.stack(box_terms).sum() / sampled_count
        return loss

    def loss(self, outputs: dict[str, Tensor], batch: dict) -> Tensor:
        """The classification loss plus ``objectness_weight`` x the localization loss."""
        if self.classification_loss == "squared":
            loss = normalized_squared_loss(outputs["scores"], batch["labels"])
        else:
            loss = masked_bce(outputs["scores"], batch["labels"])
        if self.localization is None or self.objectness_weight == 0:
            return loss
        return loss + self.objectness_weight * self.localization_loss(outputs, batch)

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """The max-pooled label probabilities: Tensor[B, C] in [0, 1], float32."""
        return outputs["scores"].float()


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RLSD's own options (the paper's values by default; shrink the widths on small machines)."""
    group = parser.add_argument_group("rlsd model")
    group.add_argument("--rlsd-variant", choices=VARIANTS, default="regional")
    group.add_argument(
        "--regions", type=int, default=256, help="M: test proposals; training takes M/2"
    )
    group.add_argument(
        "--anchor-fractions",
        type=_floats,
        default=(0.125, 0.25, 0.5, 1.0),
        help="anchor sizes as fractions of --image-size (comma-separated)",
    )
    group.add_argument("--aspect-ratios", type=_floats, default=(0.5, 1.0, 2.0))
    group.add_argument("--region-channels", type=int, default=256, help="before roi_align")
    group.add_argument("--region-fc", type=int, default=4096, help="fully-connected width")
    group.add_argument("--region-dropout", type=float, default=0.5)
    group.add_argument("--lstm-hidden", type=int, default=512)
    group.add_argument("--label-embed", type=int, default=64, help="region and label embeddings")
    group.add_argument("--rlsd-steps", type=int, default=5, help="T: LSTM steps per region")
    group.add_argument("--objectness-weight", type=float, default=1.0)
    group.add_argument(
        "--rlsd-loss",
        choices=LOSSES,
        default="squared",
        help="the paper's squared loss on L1-normalized labels, or BCE (ablation)",
    )
    group.add_argument(
        "--box-supervision",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="RLSD+ft-RPN: train the localization layer on clustered object boxes",
    )
    group.add_argument(
        "--cluster-distance", type=float, default=0.25, help="in image sides (box supervision)"
    )
    group.add_argument(
        "--rlsd-init",
        default=None,
        help="an RLSD checkpoint (e.g. --rlsd-variant global) to start matching tensors from",
    )


def load_matching(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Copy into ``model`` the tensors of ``state`` whose names and shapes match; returns their
    names (the pre-training of the LSTM by the global variant)."""
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return sorted(matching)


def build_rlsd(num_classes: int, backbone: nn.Module, args: argparse.Namespace) -> RLSD:
    """The registry builder of :class:`RLSD`."""
    model = RLSD(
        num_classes,
        backbone,
        image_size=getattr(args, "image_size", 224),
        variant=getattr(args, "rlsd_variant", "regional"),
        regions=getattr(args, "regions", 256),
        anchor_fractions=getattr(args, "anchor_fractions", (0.125, 0.25, 0.5, 1.0)),
        aspect_ratios=getattr(args, "aspect_ratios", (0.5, 1.0, 2.0)),
        region_channels=getattr(args, "region_channels", 256),
        region_fc=getattr(args, "region_fc", 4096),
        dropout=getattr(args, "region_dropout", 0.5),
        embed_dim=getattr(args, "label_embed", 64),
        hidden=getattr(args, "lstm_hidden", 512),
        steps=getattr(args, "rlsd_steps", 5),
        objectness_weight=getattr(args, "objectness_weight", 1.0),
        classification_loss=getattr(args, "rlsd_loss", "squared"),
        box_supervision=getattr(args, "box_supervision", False),
        cluster_distance=getattr(args, "cluster_distance", 0.25),
    )
    init = getattr(args, "rlsd_init", None)
    if init:
        from .checkpoint import load_checkpoint

        loaded = load_matching(model, load_checkpoint(init, model_name="rlsd")["model"])
        print(f"rlsd: {len(loaded)} tensors started from {init}")
    return model


register_model("rlsd", add_arguments)(build_rlsd)
