"""The Order-Free RNN with visual attention (Chen et al., AAAI 2018), registered as
``--model order_free_rnn``.

Structure (``B`` images, ``C`` classes, ``N = h * w`` feature-map positions)::

    backbone -> features Tensor[B, D, h, w] -> 1x1 projection to E -> V Tensor[B, N, E]
    V -> global average pool -> Linear(E, C) -> v_logits (v_prob = sigmoid, trained with BCE)
    h_0, c_0 = tanh(Linear(mean V))                                    (Show-Attend-Tell init)
    step t:  z_t = softmax(q(h_{t-1}) . k(V) / sqrt(E)) @ V            (soft attention over N,
                   mlkernels.ops.scaled_dot_product_attention)
             h_t, c_t = LSTMCell([v_pred, z_t, y_{t-1}], (h_{t-1}, c_{t-1}))
             p_t = sigmoid(Linear(ReLU(Linear([h_t, z_t]))))            (two-layer head)

``v_pred`` is v_prob *detached*: the LSTM reads the classifier's predictions as an input, the
classifier is trained by its own BCE only (the paper trains it first, as a separate stage);
``detach_v_pred=False`` lets the step losses reach it too. ``y_{t-1}`` is the hard label vector:
the multi-hot sum of the labels chosen before step t. The candidate pool: a label chosen already
is out of the loss and out of the search at every later step.

Training (teacher forcing, the paper's order-free trick): at each step the label fed to the next
step is the ground-truth positive not yet chosen with the highest p_t (no fixed label order);
once an image's positives are all chosen nothing more is fed. The loss is the BCE of v_logits
plus the mean over the T steps of the BCE of p_t against the label vector, each step leaving out
the labels chosen before it and the -1 ("ignore") labels; steps after the last positive have
all-zero targets (they teach the decoder to stop).

Inference: :func:`mlkernels.ops.beam_search` over label sets (beam size K, at most T labels, a
path stops when its probability, the product of its labels' p_t, would fall below ``threshold``).
Each label's decoder probability ``q_c`` is its p_t at the step it was chosen, the best over the
K final beams that contain it (0 where none does); they come from one teacher-forced rerun of the
K decoded paths. :meth:`OrderFreeRNN.scores` is ``(v_prob + q) / 2``: the labels the decoder
chose are ranked up by its confidence, and the classifier's v_prob still ranks every class (a
decoder output alone is 0 for most classes, which would leave mAP without an order among them).
:func:`save_attention_maps` draws the attention of each step of the best path as a PNG.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlkernels
import mlkernels.ops

from .baseline import masked_bce_with_logits
from .registry import register_model

__all__ = [
    "SCORE_SOURCES",
    "OrderFreeRNN",
    "add_arguments",
    "build_order_free_rnn",
    "save_attention_maps",
]

SCORE_SOURCES = ("mean", "classifier", "decoder")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"OrderFreeRNN: {name} must be an int >= {minimum}, got {value!r}")
    return value


class OrderFreeRNN(nn.Module):
    """Order-Free RNN: a classifier, an attention LSTM over label sets and a beam-search decoder.

    Args:
        num_classes: C >= 1.
        backbone: a ``models.backbones`` backbone (``channels`` attribute; ``forward(images
            Tensor[B, 3, H, W] in [0, 1]) -> Tensor[B, channels, h, w]``).
        feature_size: E, the width the feature map is projected to (attention keys/values).
        hidden_size: the LSTM's hidden width (512 in the paper).
        head_size: the hidden width of the two-layer prediction head.
        max_length: T, the most labels of a set (training steps and decoder length); the
            largest label count of the training set (6 for scenes).
        beam_size: K, the beams of the decoder.
        threshold: a decoded path stops when its probability would fall below this, in [0, 1].
        detach_v_pred: the LSTM input v_pred is v_prob detached (see the module docstring).
        dropout: dropout on the LSTM output before the head.
        score_source: what :meth:`scores` ranks in eval mode: "mean" ``(v_prob + q) / 2`` (the
            default), "classifier" (v_prob alone) or "decoder" (q alone; 0 for every label no
            beam chose). The last two are ablations: what each half gives the ranking.

    ``forward(images Tensor[B, 3, H, W])``: in training mode a dict of what :meth:`loss` needs
    (``"v_logits"`` Tensor[B, C], ``"features"`` Tensor[B, N, E]); in eval mode the decoded sets
    (``"v_logits"``, ``"labels"`` Tensor[B, K, T] int64 padded with -1, ``"beam_scores"``
    Tensor[B, K] log path probabilities, ``"label_probs"`` Tensor[B, C] the q above).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        *,
        feature_size: int = 512,
        hidden_size: int = 512,
        head_size: int = 512,
        max_length: int = 6,
        beam_size: int = 5,
        threshold: float = 0.25,
        detach_v_pred: bool = True,
        dropout: float = 0.0,
        score_source: str = "mean",
    ) -> None:
        super().__init__()
        _check_int("num_classes", num_classes, 1)
        for name, value in (
            ("feature_size", feature_size),
            ("hidden_size", hidden_size),
            ("head_size", head_size),
            ("max_length", max_length),
            ("beam_size", beam_size),
        ):
            _check_int(name, value, 1)
        channels = getattr(backbone, "channels", None)
        if not isinstance(backbone, nn.Module) or not isinstance(channels, int):
            raise TypeError(
                "OrderFreeRNN: backbone must be an nn.Module with an int `channels` attribute "
                f"(models.backbones.build_backbone), got {type(backbone).__name__}"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"OrderFreeRNN: threshold must be a float, got {threshold!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"OrderFreeRNN: threshold must be in [0, 1], got {threshold}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"OrderFreeRNN: dropout must be in [0, 1), got {dropout}")
        if score_source not in SCORE_SOURCES:
            raise ValueError(
                f"OrderFreeRNN: score_source must be one of {SCORE_SOURCES}, got {score_source!r}"
            )
        self.score_source = score_source
        self.num_classes = num_classes
        self.max_length = max_length
        self.beam_size = beam_size
        self.threshold = float(threshold)
        self.detach_v_pred = detach_v_pred
        self.backbone = backbone
        self.project = nn.Conv2d(channels, feature_size, kernel_size=1)
        self.classifier = nn.Linear(feature_size, num_classes)
        self.init_h = nn.Linear(feature_size, hidden_size)
        self.init_c = nn.Linear(feature_size, hidden_size)
        self.query = nn.Linear(hidden_size, feature_size)
        self.key = nn.Linear(feature_size, feature_size)
        self.cell = nn.LSTMCell(num_classes + feature_size + num_classes, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.Linear(hidden_size + feature_size, head_size),
            nn.ReLU(inplace=True),
            nn.Linear(head_size, num_classes),
        )

    # ---- the pieces ----------------------------------------------------------------------------

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """``images`` Tensor[B, 3, H, W] -> (features V Tensor[B, N, E], v_logits Tensor[B, C],
        the map size (h, w))."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"OrderFreeRNN: images must be Tensor[B, 3, H, W], got {tuple(images.shape)}"
            )
        maps = self.project(self.backbone(images))
        size = (maps.shape[2], maps.shape[3])
        features = maps.flatten(2).transpose(1, 2)
        v_logits = self.classifier(features.mean(dim=1))
        return features, v_logits, size

    def initial_state(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(h_0, c_0), each Tensor[R, hidden], from ``features`` Tensor[R, N, E]."""
        pooled = features.mean(dim=1)
        return torch.tanh(self.init_h(pooled)), torch.tanh(self.init_c(pooled))

    def attend(
        self, h: Tensor, features: Tensor, keys: Tensor, *, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Soft attention conditioned on ``h`` Tensor[R, hidden] over ``features`` (values)
        Tensor[R, N, E] with ``keys`` Tensor[R, N, E] -> (z Tensor[R, E], weights Tensor[R, N]
        or None)."""
        query = self.query(h).unsqueeze(1)
        z = mlkernels.ops.scaled_dot_product_attention(query, keys, features).squeeze(1)
        weights = None
        if need_weights:
            scale = 1.0 / math.sqrt(query.shape[-1])
            weights = torch.softmax((query @ keys.transpose(1, 2)).squeeze(1) * scale, dim=-1)
        return z, weights

    def step(
        self,
        state: tuple[Tensor, Tensor],
        chosen: Tensor,
        v_pred: Tensor,
        features: Tensor,
        keys: Tensor,
        *,
        need_weights: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
        """One decoder step: (h, c) each Tensor[R, hidden], ``chosen`` Tensor[R, C] the hard
        label vector, ``v_pred`` Tensor[R, C] -> (logits of p_t Tensor[R, C], (h, c), attention
        weights Tensor[R, N] or None)."""
        h, c = state
        z, weights = self.attend(h, features, keys, need_weights=need_weights)
        h, c = self.cell(torch.cat([v_pred, z, chosen.to(z.dtype)], dim=1), (h, c))
        logits = self.head(torch.cat([self.dropout(h), z], dim=1))
        return logits, (h, c), weights

    def _v_pred(self, v_logits: Tensor) -> Tensor:
        v_prob = torch.sigmoid(v_logits)
        return v_prob.detach() if self.detach_v_pred else v_prob

    # ---- forward, loss, scores -----------------------------------------------------------------

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images`` Tensor[B, 3, H, W] in [0, 1] -> a dict (see the class docstring)."""
        features, v_logits, _ = self.encode(images)
        if self.training:
            return {"v_logits": v_logits, "features": features}
        return {"v_logits": v_logits, **self.decode(features, v_logits)}

    def unroll(self, features: Tensor, v_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher-forced, order-free unroll of T steps.

        Args:
            features: Tensor[B, N, E]; v_logits: Tensor[B, C]; labels: Tensor[B, C] 1 / 0 / -1.

        Returns:
            (step logits Tensor[B, T, C], the hard label vector before each step Tensor[B, T, C]
            bool): step t is trained on the labels outside its pool.
        """
        keys = self.key(features)
        v_pred = self._v_pred(v_logits)
        state = self.initial_state(features)
        positive = labels > 0
        chosen = torch.zeros_like(positive)
        logits_all, pools = [], []
        for _ in range(self.max_length):
            logits, state, _ = self.step(state, chosen, v_pred, features, keys)
            logits_all.append(logits)
            pools.append(chosen)
            # The order-free choice: the best-scored positive not chosen yet, none when all are.
            candidates = positive & ~chosen
            ranked = logits.detach().float().masked_fill(~candidates, -math.inf)
            best = ranked.argmax(dim=1)
            pick = F.one_hot(best, self.num_classes).bool() & candidates.any(dim=1, keepdim=True)
            chosen = chosen | pick
        return torch.stack(logits_all, dim=1), torch.stack(pools, dim=1)

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        """BCE of v_logits plus the mean over steps of the BCE of p_t (pool and -1 left out).

        ``outputs``: the training-mode forward's dict; ``batch["labels"]`` Tensor[B, C].
        """
        if "features" not in outputs:
            raise ValueError(
                "OrderFreeRNN.loss: needs the training-mode outputs (model.train()), got the keys "
                f"{sorted(outputs)}"
            )
        labels = batch["labels"]
        v_logits = outputs["v_logits"]
        if labels.shape != v_logits.shape:
            raise ValueError(
                f"OrderFreeRNN.loss: labels must be Tensor[B, C] = Tensor{list(v_logits.shape)}, "
                f"got Tensor{list(labels.shape)}"
            )
        step_logits, pools = self.unroll(outputs["features"], v_logits, labels)
        targets = labels.unsqueeze(1).expand_as(step_logits).masked_fill(pools, -1.0)
        steps = masked_bce_with_logits(step_logits.flatten(0, 1), targets.flatten(0, 1))
        return masked_bce_with_logits(v_logits, labels) + steps

    @torch.no_grad()
    def decode(self, features: Tensor, v_logits: Tensor) -> dict[str, Tensor]:
        """Beam search over label sets: ``features`` Tensor[B, N, E], ``v_logits`` Tensor[B, C]
        -> {"labels" Tensor[B, K, T], "beam_scores" Tensor[B, K], "label_probs" Tensor[B, C]}."""
        batch, num_classes, beams = features.shape[0], self.num_classes, self.beam_size
        rows = batch * beams
        features = features.repeat_interleave(beams, 0)
        keys = self.key(features)
        v_pred = self._v_pred(v_logits).repeat_interleave(beams, 0)
        h, c = self.initial_state(features)
        chosen = torch.zeros(rows, num_classes, dtype=torch.bool, device=features.device)

        def step_fn(last: Tensor, state: tuple[Tensor, Tensor, Tensor]):
            h, c, chosen = state
            added = F.one_hot(last.clamp(min=0), num_classes).bool() & (last >= 0)[:, None]
            chosen = chosen | added
            logits, (h, c), _ = self.step((h, c), chosen, v_pred, features, keys)
            log_probs = F.logsigmoid(logits.float()).masked_fill(chosen, -math.inf)
            return log_probs, (h, c, chosen)

        result = mlkernels.ops.beam_search(
            step_fn,
            (h, c, chosen),
            batch_size=batch,
            num_labels=num_classes,
            beam_size=beams,
            max_length=self.max_length,
            threshold=self.threshold,
        )
        paths = result.labels.reshape(rows, -1)
        probs, _ = self.rerun(features, keys, v_pred, paths)
        # Each label's p_t at its step, the best over the beams containing it (0 elsewhere).
        label_probs = probs.new_zeros(rows, num_classes + 1)
        label_probs.scatter_reduce_(1, paths.clamp(min=-1) + 1, probs, reduce="amax")
        label_probs = label_probs[:, 1:].reshape(batch, beams, num_classes).amax(dim=1)
        return {
            "labels": result.labels,
            "beam_scores": result.scores,
            "label_probs": label_probs,
        }

    def rerun(
        self, features: Tensor, keys: Tensor, v_pred: Tensor, paths: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Feed the label sequences ``paths`` Tensor[R, T] (-1 padded) through the decoder.

        Returns:
            (the probability of each path label at its step Tensor[R, T] (0 at padding),
            the attention weights of each step Tensor[R, T, N]).
        """
        rows, length = paths.shape
        state = self.initial_state(features)
        chosen = torch.zeros(rows, self.num_classes, dtype=torch.bool, device=features.device)
        probs, maps = [], []
        for t in range(length):
            logits, state, weights = self.step(
                state, chosen, v_pred, features, keys, need_weights=True
            )
            label = paths[:, t]
            valid = label >= 0
            p = torch.sigmoid(logits.float()).gather(1, label.clamp(min=0)[:, None])[:, 0]
            probs.append(p * valid)
            maps.append(weights)
            chosen = chosen | (
                F.one_hot(label.clamp(min=0), self.num_classes).bool() & valid[:, None]
            )
        return torch.stack(probs, dim=1), torch.stack(maps, dim=1)

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """Tensor[B, C] in [0, 1]: ``(v_prob + q) / 2`` in eval mode (q: the decoder's label
        probabilities; see ``score_source`` for the ablations), v_prob alone for training-mode
        outputs."""
        v_prob = torch.sigmoid(outputs["v_logits"].float())
        if "label_probs" not in outputs or self.score_source == "classifier":
            return v_prob
        if self.score_source == "decoder":
            return outputs["label_probs"].float()
        return 0.5 * (v_prob + outputs["label_probs"].float())

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, max_length={self.max_length}, "
            f"beam_size={self.beam_size}, threshold={self.threshold}, "
            f"detach_v_pred={self.detach_v_pred}, score_source={self.score_source!r}"
        )


@torch.no_grad()
def save_attention_maps(
    model: OrderFreeRNN,
    image: Tensor,
    path: str | Path,
    class_names: list[str] | None = None,
) -> list[int]:
    """Draw the attention of each step of the best decoded path of one image as a PNG.

    Args:
        model: an :class:`OrderFreeRNN` (put in eval mode for the call, its mode restored).
        image: Tensor[3, H, W] float in [0, 1].
        path: the PNG to write.
        class_names: C names for the titles (default: the class indices).

    Returns:
        the decoded labels, in order (one panel each after the image itself).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(model, OrderFreeRNN):
        raise TypeError(f"save_attention_maps: model must be an OrderFreeRNN, got {type(model)}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"save_attention_maps: image must be Tensor[3, H, W], got {tuple(image.shape)}"
        )
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(
            f"save_attention_maps: class_names must have {model.num_classes} names, "
            f"got {len(class_names)}"
        )
    was_training = model.training
    model.eval()
    try:
        features, v_logits, (h, w) = model.encode(image[None])
        decoded = model.decode(features, v_logits)
        best = decoded["labels"][0, 0]
        labels = [int(x) for x in best[best >= 0]]
        v_pred = model._v_pred(v_logits)
        probs, maps = model.rerun(features, model.key(features), v_pred, best[None])
    finally:
        model.train(was_training)
    names = class_names or [str(i) for i in range(model.num_classes)]
    picture = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    panels = 1 + max(1, len(labels))
    figure, axes = plt.subplots(1, panels, figsize=(2.4 * panels, 2.6), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image", fontsize=8)
    extent = (0, picture.shape[1], picture.shape[0], 0)
    for t, label in enumerate(labels):
        axis = axes[0, t + 1]
        axis.imshow(picture)
        heat = maps[0, t].reshape(h, w).float().cpu().numpy()
        axis.imshow(heat, cmap="jet", alpha=0.5, extent=extent, interpolation="bilinear")
        axis.set_title(f"{t + 1}: {names[label]} ({float(probs[0, t]):.2f})", fontsize=8)
    if not labels:
        axes[0, 1].set_title("no label decoded", fontsize=8)
    for axis in axes[0]:
        axis.axis("off")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Order-Free RNN's own options."""
    group = parser.add_argument_group("order_free_rnn model")
    group.add_argument("--feature-size", type=int, default=512, help="projected feature width")
    group.add_argument("--hidden-size", type=int, default=512, help="LSTM width (paper: 512)")
    group.add_argument("--head-size", type=int, default=512, help="prediction head width")
    group.add_argument(
        "--max-labels",
        type=int,
        default=6,
        help="T: RNN steps and most decoded labels (the largest label count in training)",
    )
    group.add_argument("--beam-size", type=int, default=5, help="beams of the decoder")
    group.add_argument(
        "--decode-threshold",
        type=float,
        default=0.25,
        help="a decoded path stops when its probability falls below this (the paper picks it "
        "on the validation split)",
    )
    group.add_argument(
        "--detach-v-pred",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the LSTM reads v_prob without passing gradients back to the classifier",
    )
    group.add_argument("--rnn-dropout", type=float, default=0.0, help="before the head")
    group.add_argument(
        "--of-scores",
        choices=SCORE_SOURCES,
        default="mean",
        help="what the metrics rank: (v_prob + q) / 2, v_prob alone or the decoder's q alone",
    )


@register_model("order_free_rnn", add_arguments)
def build_order_free_rnn(
    num_classes: int, backbone: nn.Module, args: argparse.Namespace
) -> OrderFreeRNN:
    """The registry builder of :class:`OrderFreeRNN`."""
    return OrderFreeRNN(
        num_classes,
        backbone,
        feature_size=getattr(args, "feature_size", 512),
        hidden_size=getattr(args, "hidden_size", 512),
        head_size=getattr(args, "head_size", 512),
        max_length=getattr(args, "max_labels", 6),
        beam_size=getattr(args, "beam_size", 5),
        threshold=getattr(args, "decode_threshold", 0.25),
        detach_v_pred=getattr(args, "detach_v_pred", True),
        dropout=getattr(args, "rnn_dropout", 0.0),
        score_source=getattr(args, "of_scores", "mean"),
    )
