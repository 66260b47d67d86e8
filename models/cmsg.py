"""CMSG: label queries with semantic-guided (label-correlation biased) and spatial-aware attention.

Registered as ``--model cmsg``. The network, for images -> backbone features ``F``
Tensor[B, D, h, w]:

1. **Label queries** ``x0`` Tensor[B, C, d]: a learned query per class, plus (by default) the
   class's label-name embedding (:mod:`models.label_embeddings`, 384-dim) through a linear layer,
   plus the image's globally pooled feature through a linear layer (so that the first
   semantic-guided attention already sees the image; without it that layer would be the same for
   every image).
2. ``layers`` times (pre-norm residual blocks, dropout on the residual branches):

   - **semantic-guided attention** (SGA): multi-head self-attention among the C label queries
     through :func:`mlkernels.ops.scaled_dot_product_attention` with a float mask: a learnable
     bias ``Tensor[C, C]`` (one per layer, shared by the batch and the heads) where the
     label-correlation graph has an edge, ``-inf`` where it has none. The bias gets its gradient
     from the fused kernel (torch's CPU SDPA would take its math path for a mask with a gradient).
   - a feed-forward layer (d -> ffn_dim -> d, GELU);
   - **spatial-aware attention** (SAA): multi-head cross-attention from the label queries to every
     position of the projected feature map (1x1 conv D -> d, plus a 2-D sine position encoding on
     the keys), :class:`mlkernels.nn.MultiheadAttention` (``batch_first=True``);
   - a feed-forward layer.

   With ``layers=1`` this is exactly SGA -> FFN -> SAA -> FFN; with more, later SGA layers reason
   over labels that already gathered class-specific image evidence.
3. A final LayerNorm and a **per-class classifier**: ``logit_c = <W_c, x_c> + b_c`` with
   ``W`` Tensor[C, d], ``b`` Tensor[C].

The label-correlation graph (ML-GCN's re-weighting, Chen et al. 2019, eq. 7-8, with label-name
similarity instead of co-occurrence counts): ``S`` = cosine similarity of the label-name
embeddings; ``A = (S >= tau)`` off the diagonal (binarized); row-wise
``A'_ij = p * A_ij / sum_{k != i} A_ik`` for ``i != j`` and ``A'_ii = 1 - p`` (a row without
neighbours keeps only its diagonal). Attention is allowed where ``A' > 0`` (always on the
diagonal, so no row is ever fully masked) and the learnable bias starts at ``A'``.
``correlation=None`` (``--cmsg-correlation none``, an ablation) allows every pair and starts the
bias at zero; ``freeze_bias`` keeps the bias at its initial value (another ablation).

Loss: the asymmetric loss (ASL, Ridnik et al. 2021) with ``gamma_neg=4``, ``gamma_pos=1``,
probability shifting ``clip=0.05``, averaged over the labels that are not -1 ("ignore").
``scores`` = sigmoid of the logits.

Class names: the builder needs them for the label-name embeddings. It takes ``args.class_names``
when the caller sets it, else the names of ``--data`` (the scenes benchmark's without opening it,
others by opening the train split). When they cannot be found (e.g. ``models.predict`` on a
machine without the dataset), it warns and starts with zero embeddings and no correlation edges:
the buffers ``similarity``, ``attend`` and ``label_embeddings`` and the bias are in the state dict,
so loading a checkpoint restores them.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlkernels
import mlkernels.nn
import mlkernels.ops

from .registry import register_model

__all__ = [
    "CMSG",
    "SemanticGuidedAttention",
    "asymmetric_loss",
    "correlation_graph",
    "sine_position_encoding",
]


def asymmetric_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-8,
) -> Tensor:
    """The asymmetric loss (ASL) averaged over the labels that are not "ignore".

    With ``p = sigmoid(logit)`` and the shifted probability ``p_m = max(p - clip, 0)``:
    ``L+ = -(1 - p)^gamma_pos log(p)`` for a positive, ``L- = -p_m^gamma_neg log(1 - p_m)`` for
    a negative. ASL sums these; here the sum is divided by the number of known labels (as the
    baseline's BCE), which only rescales it.

    Args:
        logits: ``Tensor[B, C]`` float.
        labels: ``Tensor[B, C]`` float, 1 present, 0 absent, -1 ignore (left out).
        gamma_neg, gamma_pos: the focusing exponents (>= 0).
        clip: the probability margin of negatives, in [0, 1).
        eps: the smallest probability inside a log.

    Returns:
        ``Tensor[]`` float32 (0, with a gradient, when no label is known).
    """
    if logits.shape != labels.shape:
        raise ValueError(
            f"asymmetric_loss: logits and labels must have the same shape, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if gamma_neg < 0 or gamma_pos < 0 or not 0.0 <= clip < 1.0:
        raise ValueError(
            f"asymmetric_loss: gamma_neg and gamma_pos must be >= 0 and clip in [0, 1), got "
            f"gamma_neg={gamma_neg}, gamma_pos={gamma_pos}, clip={clip}"
        )
    x = logits.float()
    known = (labels >= 0).to(x.dtype)
    positive = (labels > 0).to(x.dtype)
    p = torch.sigmoid(x)
    log_p = F.logsigmoid(x).clamp(min=math.log(eps))
    if clip > 0:
        p_shifted = (p - clip).clamp(min=0.0)
        log_not_p = torch.log((1.0 - p_shifted).clamp(min=eps))
    else:
        p_shifted = p
        log_not_p = F.logsigmoid(-x).clamp(min=math.log(eps))
    loss_pos = (1.0 - p).pow(gamma_pos) * log_p
    loss_neg = p_shifted.pow(gamma_neg) * log_not_p
    losses = -(positive * loss_pos + (1.0 - positive) * loss_neg)
    return (losses * known).sum() / known.sum().clamp(min=1)


def correlation_graph(similarity: Tensor, tau: float, p: float) -> tuple[Tensor, Tensor]:
    """ML-GCN's thresholded, re-weighted graph of a label-similarity matrix.

    Args:
        similarity: ``Tensor[C, C]`` float (e.g. cosine similarity of label-name embeddings).
        tau: the edge threshold: an edge i-j (i != j) where ``similarity[i, j] >= tau``.
        p: the weight of the neighbours, in [0, 1): each row's edges share ``p`` equally and the
            diagonal gets ``1 - p``.

    Returns:
        ``(weights, attend)``: ``weights`` Tensor[C, C] float32, ``A'`` of the module docstring;
        ``attend`` Tensor[C, C] bool, True on the edges and the diagonal.

    Raises:
        ValueError: ``similarity`` is not square, or ``p`` is outside [0, 1).
    """
    if not isinstance(similarity, Tensor) or similarity.dim() != 2:
        shape = tuple(similarity.shape) if isinstance(similarity, Tensor) else type(similarity)
        raise ValueError(f"correlation_graph: similarity must be Tensor[C, C], got {shape}")
    if similarity.shape[0] != similarity.shape[1]:
        raise ValueError(
            f"correlation_graph: similarity must be Tensor[C, C] (square), got "
            f"{tuple(similarity.shape)}"
        )
    if not 0.0 <= p < 1.0:
        raise ValueError(f"correlation_graph: p must be in [0, 1), got {p}")
    c = similarity.shape[0]
    eye = torch.eye(c, dtype=torch.bool, device=similarity.device)
    edges = (similarity.float() >= tau) & ~eye
    counts = edges.sum(dim=1, keepdim=True).clamp(min=1).float()
    weights = p * edges.float() / counts + (1.0 - p) * eye.float()
    return weights, edges | eye


def sine_position_encoding(
    height: int,
    width: int,
    dim: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DETR's 2-D sine position encoding: Tensor[height * width, dim], row-major positions.

    The first ``dim / 2`` channels encode the row (sin and cos of ``dim / 4`` frequencies of the
    normalized coordinate times 2 pi, temperature 10000), the rest the column. ``dim`` must be a
    multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sine_position_encoding: dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    freqs = 10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    y = ys[:, None] / freqs  # [h, dim/4]
    x = xs[:, None] / freqs  # [w, dim/4]
    y = torch.cat([y.sin(), y.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    x = torch.cat([x.sin(), x.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([y, x], dim=2).reshape(height * width, dim).to(dtype)


class SemanticGuidedAttention(nn.Module):
    """Multi-head self-attention among label queries with a masked, learnable label bias.

    ``forward(x Tensor[B, C, d], attend Tensor[C, C] bool) -> Tensor[B, C, d]``:
    ``softmax(q k^T / sqrt(d / heads) + M) v`` per head, then an output projection, where ``M``
    Tensor[C, C] is ``bias`` where ``attend`` is True (query i may attend to label j; True on the
    diagonal) and ``-inf`` elsewhere, broadcast over the batch and the heads; computed
    by :func:`mlkernels.ops.scaled_dot_product_attention` (``bias`` gets its gradient there).

    Args:
        dim: d. heads: the number of heads (divides d).
        bias_init: ``Tensor[C, C]`` float, the bias's initial value.
        freeze_bias: keep the bias at ``bias_init`` (no gradient).
    """

    def __init__(
        self, dim: int, heads: int, bias_init: Tensor, *, freeze_bias: bool = False
    ) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.bias = nn.Parameter(bias_init.detach().clone().float(), requires_grad=not freeze_bias)

    def masked_bias(self, attend: Tensor, dtype: torch.dtype) -> Tensor:
        """``Tensor[C, C]`` in ``dtype``: the bias where ``attend`` is True, -inf elsewhere."""
        return self.bias.to(dtype).masked_fill(~attend, -math.inf)

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        batch, count, dim = x.shape
        qkv = self.qkv(x).view(batch, count, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, C, d / H]
        mixed = mlkernels.ops.scaled_dot_product_attention(
            q, k, v, attn_mask=self.masked_bias(attend, q.dtype)
        )
        return self.out(mixed.transpose(1, 2).reshape(batch, count, dim))


def _ffn(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
    )


class _Layer(nn.Module):
    """SGA -> FFN -> SAA -> FFN, each a pre-norm residual block."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float,
        bias_init: Tensor,
        freeze_bias: bool,
    ) -> None:
        super().__init__()
        self.norm_sga = nn.LayerNorm(dim)
        self.sga = SemanticGuidedAttention(dim, heads, bias_init, freeze_bias=freeze_bias)
        self.norm_ffn1 = nn.LayerNorm(dim)
        self.ffn1 = _ffn(dim, ffn_dim, dropout)
        self.norm_saa = nn.LayerNorm(dim)
        self.saa = mlkernels.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ffn2 = nn.LayerNorm(dim)
        self.ffn2 = _ffn(dim, ffn_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attend: Tensor, memory: Tensor, memory_keys: Tensor) -> Tensor:
        x = x + self.drop(self.sga(self.norm_sga(x), attend))
        x = x + self.drop(self.ffn1(self.norm_ffn1(x)))
        # mlkernels.nn.MultiheadAttention wants inputs of its own dtype, which autocast breaks
        # (LayerNorm gives float32, the 1x1 conv bfloat16): its projections autocast anyway.
        dtype = self.saa.in_proj_weight.dtype
        spatial, _ = self.saa(
            self.norm_saa(x).to(dtype),
            memory_keys.to(dtype),
            memory.to(dtype),
            need_weights=False,
        )
        x = x + self.drop(spatial)
        return x + self.drop(self.ffn2(self.norm_ffn2(x)))


class CMSG(nn.Module):
    """Label queries -> (semantic-guided attention, FFN, spatial-aware attention, FFN) x layers
    -> per-class classifier; see the module docstring.

    Args:
        num_classes: C.
        backbone: a ``models.backbones`` backbone (``channels`` attribute; ``forward(images
            Tensor[B, 3, H, W] in [0, 1]) -> Tensor[B, channels, h, w]``).
        similarity: ``Tensor[C, C]`` label similarity (cosine of the label-name embeddings, see
            :func:`models.label_embeddings.cosine_similarity_matrix`), or None: no correlation
            graph (every pair attends, the bias starts at 0).
        label_embeddings: ``Tensor[C, E]`` label-name embeddings added (through a linear layer)
            to the learned queries, or None: learned queries only.
        dim: d, the width of the label queries (a multiple of 4 and of ``heads``).
        heads: attention heads of both attentions.
        layers: the number of SGA/SAA layers (>= 1).
        ffn_dim: the hidden width of the feed-forward layers (default 4 d).
        tau, p: the graph's threshold and neighbour weight (:func:`correlation_graph`).
        dropout: dropout on the residual branches and inside the FFNs (not on the attention
            probabilities, which would take the attention op off its kernels).
        freeze_bias: keep the label-correlation bias at its initial value.
        gamma_neg, gamma_pos, clip: the asymmetric loss's settings.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        *,
        similarity: Tensor | None = None,
        label_embeddings: Tensor | None = None,
        dim: int = 256,
        heads: int = 8,
        layers: int = 2,
        ffn_dim: int | None = None,
        tau: float = 0.4,
        p: float = 0.2,
        dropout: float = 0.1,
        freeze_bias: bool = False,
        gamma_neg: float = 4.0,
        gamma_pos: float = 1.0,
        clip: float = 0.05,
    ) -> None:
        super().__init__()
        c = num_classes
        if not isinstance(c, int) or c < 1:
            raise ValueError(f"CMSG: num_classes must be an int >= 1, got {c!r}")
        if not isinstance(getattr(backbone, "channels", None), int):
            raise ValueError(
                f"CMSG: backbone must be a models.backbones backbone with an int 'channels' "
                f"attribute, got {type(backbone).__name__}"
            )
        if dim < 4 or dim % 4 or heads < 1 or dim % heads:
            raise ValueError(
                f"CMSG: dim must be a positive multiple of 4 and of heads (heads >= 1), got "
                f"dim={dim}, heads={heads}"
            )
        if layers < 1:
            raise ValueError(f"CMSG: layers must be >= 1, got {layers}")
        ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        if ffn_dim < 1:
            raise ValueError(f"CMSG: ffn_dim must be >= 1, got {ffn_dim}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"CMSG: p must be in [0, 1), got {p}")
        if not -1.0 <= tau <= 1.0:
            raise ValueError(f"CMSG: tau must be in [-1, 1] (a cosine similarity), got {tau}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"CMSG: dropout must be in [0, 1), got {dropout}")
        if gamma_neg < 0 or gamma_pos < 0 or not 0.0 <= clip < 1.0:
            raise ValueError(
                f"CMSG: gamma_neg and gamma_pos must be >= 0 and clip in [0, 1), got "
                f"gamma_neg={gamma_neg}, gamma_pos={gamma_pos}, clip={clip}"
            )
        if similarity is not None and tuple(similarity.shape) != (c, c):
            raise ValueError(
                f"CMSG: similarity must be Tensor[{c}, {c}] (num_classes squared) or None, got "
                f"{tuple(similarity.shape)}"
            )
        if label_embeddings is not None and (
            label_embeddings.dim() != 2 or label_embeddings.shape[0] != c
        ):
            raise ValueError(
                f"CMSG: label_embeddings must be Tensor[{c}, E] (a row per class) or None, got "
                f"{tuple(label_embeddings.shape)}"
            )
        self.num_classes, self.dim = c, dim
        self.tau, self.p = float(tau), float(p)
        self.gamma_neg, self.gamma_pos, self.clip = float(gamma_neg), float(gamma_pos), float(clip)
        self.backbone = backbone

        if similarity is None:
            self.register_buffer("similarity", torch.zeros(c, c))
            bias_init = torch.zeros(c, c)
            attend = torch.ones(c, c, dtype=torch.bool)
        else:
            self.register_buffer("similarity", similarity.detach().float().clone())
            bias_init, attend = correlation_graph(self.similarity, tau, p)
        self.register_buffer("attend", attend)

        self.queries = nn.Parameter(torch.randn(c, dim) * 0.02)
        if label_embeddings is None:
            self.register_buffer("label_embeddings", None)
            self.embed_names = None
        else:
            self.register_buffer("label_embeddings", label_embeddings.detach().float().clone())
            self.embed_names = nn.Linear(label_embeddings.shape[1], dim)
        self.image_context = nn.Linear(backbone.channels, dim)
        self.input_proj = nn.Conv2d(backbone.channels, dim, kernel_size=1)
        self.layers = nn.ModuleList(
            _Layer(dim, heads, ffn_dim, dropout, bias_init, freeze_bias) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        bound = 1.0 / math.sqrt(dim)
        self.classifier_weight = nn.Parameter(torch.empty(c, dim).uniform_(-bound, bound))
        self.classifier_bias = nn.Parameter(torch.empty(c).uniform_(-bound, bound))

    def forward(self, images: Tensor) -> Tensor:
        """``images`` Tensor[B, 3, H, W] float in [0, 1] -> logits Tensor[B, C]."""
        features = self.backbone(images)  # [B, D, h, w]
        batch, _, height, width = features.shape
        memory = self.input_proj(features).flatten(2).transpose(1, 2)  # [B, h*w, d]
        position = sine_position_encoding(
            height, width, self.dim, device=memory.device, dtype=memory.dtype
        )
        memory_keys = memory + position
        x = self.queries
        if self.embed_names is not None:
            x = x + self.embed_names(self.label_embeddings)
        context = self.image_context(features.mean(dim=(2, 3)))  # [B, d]
        x = x.unsqueeze(0) + context.unsqueeze(1)  # [B, C, d]
        for layer in self.layers:
            x = layer(x, self.attend, memory, memory_keys)
        x = self.norm(x)
        return (x * self.classifier_weight.to(x.dtype)).sum(-1) + self.classifier_bias.to(x.dtype)

    def loss(self, outputs: Tensor, batch: dict) -> Tensor:
        """Asymmetric loss of the logits ``outputs`` Tensor[B, C] against ``batch["labels"]``
        (-1 labels ignored)."""
        return asymmetric_loss(
            outputs,
            batch["labels"],
            gamma_neg=self.gamma_neg,
            gamma_pos=self.gamma_pos,
            clip=self.clip,
        )

    def scores(self, outputs: Tensor) -> Tensor:
        """Sigmoid of the logits: Tensor[B, C] in [0, 1], float32."""
        return torch.sigmoid(outputs.float())


# ---- the trainer's side: options, class names, the builder ---------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CMSG's own options (all ``--cmsg-*``)."""
    group = parser.add_argument_group("cmsg model")
    group.add_argument("--cmsg-dim", type=int, default=256, help="label-query width d")
    group.add_argument("--cmsg-heads", type=int, default=8, help="attention heads")
    group.add_argument("--cmsg-layers", type=int, default=2, help="SGA/SAA layers")
    group.add_argument("--cmsg-ffn-dim", type=int, default=None, help="FFN width (4 d)")
    group.add_argument("--cmsg-tau", type=float, default=0.4, help="correlation threshold")
    group.add_argument("--cmsg-p", type=float, default=0.2, help="neighbour weight (ML-GCN p)")
    group.add_argument("--cmsg-dropout", type=float, default=0.1, help="residual/FFN dropout")
    group.add_argument(
        "--cmsg-correlation",
        choices=("names", "none"),
        default="names",
        help="label-correlation graph: from label-name embeddings, or none (ablation)",
    )
    group.add_argument(
        "--cmsg-freeze-bias",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep the label-correlation attention bias at its initial value (ablation)",
    )
    group.add_argument(
        "--cmsg-label-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the projected label-name embeddings to the learned label queries",
    )
    group.add_argument("--cmsg-gamma-neg", type=float, default=4.0, help="ASL gamma-")
    group.add_argument("--cmsg-gamma-pos", type=float, default=1.0, help="ASL gamma+")
    group.add_argument("--cmsg-clip", type=float, default=0.05, help="ASL probability clip")


def class_names_of(args: argparse.Namespace, num_classes: int) -> list[str] | None:
    """The class names for the model: ``args.class_names``, else those of ``args.data``; None
    when they cannot be found or their count is not ``num_classes``."""
    names = getattr(args, "class_names", None)
    if names is None:
        spec = str(getattr(args, "data", "") or "")
        try:
            if spec == "scenes" or spec.startswith("scenes:"):
                from .data.scenes import scene_classes

                names = scene_classes()
            elif spec:
                from .data import open_dataset

                options = getattr(args, "data_options", None) or {}
                names = list(open_dataset(spec, "train", **options).classes)
        except Exception:  # any failure means "unknown": the caller warns
            names = None
    if names is None or len(names) != num_classes:
        return None
    return list(names)


@register_model("cmsg", add_arguments)
def build_cmsg(num_classes: int, backbone: nn.Module, args: argparse.Namespace) -> CMSG:
    """The registry builder of :class:`CMSG` (label-name embeddings computed or read from the
    cache of :mod:`models.label_embeddings`)."""
    from .label_embeddings import EMBEDDING_DIM, cosine_similarity_matrix, label_name_embeddings

    use_names = getattr(args, "cmsg_label_embeddings", True)
    use_graph = getattr(args, "cmsg_correlation", "names") == "names"
    embeddings = similarity = None
    if use_names or use_graph:
        names = class_names_of(args, num_classes)
        if names is None:
            warnings.warn(
                f"build_cmsg: the {num_classes} class names of --data "
                f"{getattr(args, 'data', None)!r} are unknown; the label-name embeddings start "
                "at zero and the correlation graph empty (loading a checkpoint's state dict "
                "restores both)",
                stacklevel=2,
            )
            embeddings = torch.zeros(num_classes, EMBEDDING_DIM)
            similarity = torch.eye(num_classes)
        else:
            embeddings = label_name_embeddings(names)
            similarity = cosine_similarity_matrix(embeddings)
    return CMSG(
        num_classes,
        backbone,
        similarity=similarity if use_graph else None,
        label_embeddings=embeddings if use_names else None,
        dim=getattr(args, "cmsg_dim", 256),
        heads=getattr(args, "cmsg_heads", 8),
        layers=getattr(args, "cmsg_layers", 2),
        ffn_dim=getattr(args, "cmsg_ffn_dim", None),
        tau=getattr(args, "cmsg_tau", 0.4),
        p=getattr(args, "cmsg_p", 0.2),
        dropout=getattr(args, "cmsg_dropout", 0.1),
        freeze_bias=getattr(args, "cmsg_freeze_bias", False),
        gamma_neg=getattr(args, "cmsg_gamma_neg", 4.0),
        gamma_pos=getattr(args, "cmsg_gamma_pos", 1.0),
        clip=getattr(args, "cmsg_clip", 0.05),
    )
