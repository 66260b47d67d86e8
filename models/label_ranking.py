"""Image-dependent label ranking: a linear transformation per image that ranks fixed label vectors.

Registered as ``--model label_ranking``. The seed paper's idea ("learning a transformation from
an image"): the image does not get one classifier per label; it gets a matrix ``A`` that maps
every label's fixed word vector, and labels are ranked by how long their vector stays under it.

- **Transformation**: the backbone's features ``X`` (``Tensor[B, D, h, w]``) -> global average
  pooling (``Tensor[B, D]``) -> a linear layer ``D -> k * d`` -> ``A`` (``Tensor[B, k, d]``, one
  ``k x d`` matrix per image; ``k`` is ``rank_dim``, 100 by default, ``d`` the label-vector size).
- **Label vectors** ``W`` (``Tensor[C, d]``, a buffer: fixed, not trained, in the state dict):
  the classes' MiniLM name embeddings (:func:`models.label_embeddings.label_name_embeddings`,
  ``d = 384``) by default, or the word vectors of a GloVe / word2vec text file
  (``--label-vectors PATH``, read by :func:`read_label_vectors`). Each row is scaled to unit
  length before use, so every label enters with the same weight whatever its source.
- **Ranking score** of label ``c`` for image ``i``: by default the squared norm
  ``s_ic = ||A_i w_c||^2`` (``w_c`` the unit-length ``W_c``), smooth everywhere;
  ``--rank-score norm`` uses ``s_ic = ||A_i w_c||`` instead (as ``sqrt(||A_i w_c||^2 + 1e-8)``,
  finite at 0). The two rank labels identically; they differ in training: the squared norm's
  gradient ``2 (A w) w^T`` fades as a score nears 0, so a positive whose score collapsed is slow
  to recover, while the norm's gradient ``(A w) w^T / ||A w||`` has unit size. Measured on the
  scenes benchmark at the demo budget (``--rank-pairing each``), the norm did worse: test mAP
  16.6 (val 17.0 after epoch 1, 15.8 after epoch 2) against the squared norm's 29.8, so the
  squared norm stays the default.
- **Loss**: a hinge rank loss with margin ``m`` (:func:`rank_hinge_loss`) against up to
  ``negatives`` (40) of each image's negative labels, sampled without replacement with torch's
  RNG (all of them where an image has fewer). By default (``--rank-pairing each``) every positive
  must exceed every sampled negative by ``m``:
  ``l_i = mean_{p in P_i, j in N_i} max(0, m - s_ip + s_ij)``. The batch loss is the mean of
  ``l_i`` over the images with at least one positive and one negative (the others contribute 0);
  labels -1 are neither positive nor negative.

  ``--rank-pairing mean`` is the formulation of the issue: the *mean* score of the positives must
  exceed each sampled negative by ``m``, ``l_i = mean_j max(0, m - mean_{p in P_i} s_ip +
  s_ij)``. With an unbounded score it is degenerate: one positive with a large score lifts the
  mean over every negative, and the image's other positives need not rank above anything. On the
  scenes benchmark at the demo budget it drove the training loss to 0.08 while the test mAP
  stayed at chance (14.1; the same checkpoint on 96 training images: mAP 15, top-3 precision
  0.29), which is why ``each`` is the default; ``each`` gave a test mAP of 29.8 (val 32.3, top-3
  OF1 0.50) with the same command (the baseline's is 76.2).
- **Scores** (:meth:`LabelRanking.scores`): ``sigmoid(4 (s - m / 2) / m)`` in [0, 1], a monotone map
  of the ranking score, so the metrics rank exactly as ``s`` does; ``s = 0`` maps to 0.12,
  ``s = m`` to 0.88, and the 0.5 threshold of the F1 metrics sits at ``s = m / 2``. The loss only
  orders labels within an image, so nothing calibrates that threshold: at the demo budget nearly
  every score ends above it (test CR 0.99, CP 0.10) and the thresholded F1 is poor; the ranking
  metrics (mAP, top-k) are the ones that mean something for this model.

**Scale.** The hinge fixes the scale: the squared norm is unbounded, and the margin ``m`` says
how far apart positives and negatives must be, in the units of ``s``. With unit-length label
vectors the score depends only on ``A`` (``s <= ||A||_2^2``), not on how long a source's vectors
happen to be (word2vec's and GloVe's norms vary by word). The linear layer keeps PyTorch's default
initialization: with ImageNet EfficientNet-Lite0 features of 128 px noise images the first scores
are about 2.5-8 (mean 5) for ``k = 100``, a few margins, so the hinge is active from the first
step. No log or temperature is used; the fixed ``4 / m`` slope of the scores only places the F1
threshold.

**Zero-shot.** :meth:`LabelRanking.rank` scores any label vectors (``Tensor[C', d]``) through the
same ``A``, and :meth:`LabelRanking.label_vectors_for` makes the vectors of any class names from
the training source (MiniLM names, or the same vector file), so names never seen in training are
ranked through the same API: ``model.rank(images, model.label_vectors_for(["sofa", "boat"]))``.
``python -m models.label_ranking --checkpoint CKPT IMAGE... --labels sofa,boat`` does it for a
trained model.

This model uses no mlkernels op (the backbones do not either): under
``mlkernels.reference.replacing_ops()`` it computes the same thing.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

__all__ = [
    "LabelRanking",
    "build_label_ranking",
    "class_words",
    "PAIRINGS",
    "SCORES",
    "rank_hinge_loss",
    "read_label_vectors",
]

_WORD_SPLIT = re.compile(r"[\s_\-]+")


def class_words(name: str) -> list[str]:
    """The words of a class name: ``"potted_plant"``, ``"potted-plant"`` and ``"potted plant"``
    all give ``["potted", "plant"]``.

    Raises:
        ValueError: ``name`` has no word.
    """
    words = [w for w in _WORD_SPLIT.split(str(name)) if w]
    if not words:
        raise ValueError(f"class_words: class name {name!r} has no word")
    return words


def read_label_vectors(path: str | Path, names: Sequence[str]) -> Tensor:
    """The word vectors of class names from a GloVe / word2vec text file: Tensor[C, d] float32.

    The file has one word a line, ``word v1 ... vd`` (spaces); a first line of two integers,
    ``count dim`` as word2vec writes it, is a header and skipped. A class name of several words
    (``potted_plant``, ``traffic light``, see :func:`class_words`) gets the mean of its words'
    vectors. A word is looked up as written, then in lower case (GloVe's words are lower case).
    Only the lines of the words needed are kept, so a large file costs one pass and no memory.

    Args:
        path: the text file (UTF-8).
        names: the C class names, in label order.

    Returns:
        ``Tensor[C, d]`` float32, row c for ``names[c]`` (not normalized).

    Raises:
        ValueError: ``names`` is empty; a needed word is not in the file (the message names the
            class and the word); the file's vectors do not all have the same size; a vector
            value is not a number.
        OSError: the file cannot be read.
    """
    names = list(names)
    if not names:
        raise ValueError("read_label_vectors: names must be a non-empty list of class names")
    words_of = {name: class_words(name) for name in names}
    wanted = {w for words in words_of.values() for w in words}
    wanted |= {w.lower() for w in wanted}
    found: dict[str, Tensor] = {}
    dim = None
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            parts = line.rstrip("\n").split(" ")
            parts = [p for p in parts if p] if number == 1 else parts
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec's "count dim" header
            if not parts or not parts[0]:
                continue
            word = parts[0]
            values = [p for p in parts[1:] if p]
            if dim is None:
                dim = len(values)
                if dim == 0:
                    raise ValueError(
                        f"read_label_vectors: {path}:{number}: a word without a vector"
                    )
            elif len(values) != dim:
                raise ValueError(
                    f"read_label_vectors: {path}:{number}: the vector of {word!r} has "
                    f"{len(values)} values, expected {dim} (the size of the first vector)"
                )
            if word in wanted and word not in found:
                try:
                    found[word] = torch.tensor([float(v) for v in values], dtype=torch.float32)
                except ValueError:
                    raise ValueError(
                        f"read_label_vectors: {path}:{number}: the vector of {word!r} holds "
                        f"something that is not a number"
                    ) from None
    rows = []
    for name in names:
        vectors = []
        for word in words_of[name]:
            vector = found.get(word, found.get(word.lower()))
            if vector is None:
                raise ValueError(
                    f"read_label_vectors: class {name!r}: the word {word!r} is not in {path}"
                )
            vectors.append(vector)
        rows.append(torch.stack(vectors).mean(dim=0))
    return torch.stack(rows)


def _vector_size(path: str | Path) -> int:
    """The size d of the vectors of a word-vector file (its first vector's).

    Raises:
        ValueError: the file cannot be read or holds no vector.
    """
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                parts = line.split()
                if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    return int(parts[1])
                if len(parts) >= 2:
                    return len(parts) - 1
    except OSError as error:
        raise ValueError(f"--label-vectors: cannot read {path}: {error.strerror}") from None
    raise ValueError(f"--label-vectors: {path} holds no word vector")


def _sample_negatives(negative: Tensor, count: int) -> Tensor:
    """A mask of up to ``count`` entries per row of the bool mask ``negative`` (Tensor[B, C]),
    drawn uniformly without replacement with torch's RNG (all of them where a row has fewer)."""
    if count >= negative.shape[1]:
        return negative
    keys = torch.rand(negative.shape, device=negative.device)
    keys = keys.masked_fill(~negative, -1.0)  # never drawn before a true negative
    chosen = keys.topk(count, dim=1).indices
    picked = torch.zeros_like(negative).scatter_(1, chosen, True)
    return picked & negative


PAIRINGS = ("each", "mean")
SCORES = ("squared", "norm")


def rank_hinge_loss(
    ranking: Tensor,
    labels: Tensor,
    margin: float = 1.0,
    negatives: int = 40,
    pairing: str = "each",
) -> Tensor:
    """The hinge rank loss of the label-ranking model (see the module docstring).

    For image ``i`` with positives ``P_i`` and up to ``negatives`` negatives ``N_i`` sampled
    without replacement (torch's RNG):

    - ``pairing="each"``: every positive must beat every sampled negative by ``margin``,
      ``l_i = mean_{p in P_i, j in N_i} max(0, margin - s_ip + s_ij)``;
    - ``pairing="mean"``: the positives' mean must beat each sampled negative,
      ``l_i = mean_{j in N_i} max(0, margin - mean_{p in P_i} s_ip + s_ij)``. With an unbounded
      score one large positive pays for all the others, which then need not rank above anything
      (see the module docstring).

    Images without a positive or without a negative contribute 0.

    Args:
        ranking: ``Tensor[B, C]`` float, the ranking scores ``s``.
        labels: ``Tensor[B, C]``, 1 present, 0 absent, -1 ignore (neither).
        margin: ``m`` > 0.
        negatives: how many negatives each image draws, >= 1.
        pairing: ``"each"`` or ``"mean"``.

    Returns:
        ``Tensor[]`` float32: the mean of ``l_i`` over the images with a positive and a negative
        (0, with a gradient, when there is none).
    """
    if ranking.dim() != 2 or labels.shape != ranking.shape:
        raise ValueError(
            f"rank_hinge_loss: ranking and labels must be Tensor[B, C] of the same shape, got "
            f"{tuple(ranking.shape)} and {tuple(labels.shape)}"
        )
    if not margin > 0:
        raise ValueError(f"rank_hinge_loss: margin must be > 0, got {margin}")
    if negatives < 1:
        raise ValueError(f"rank_hinge_loss: negatives must be >= 1, got {negatives}")
    if pairing not in PAIRINGS:
        raise ValueError(f"rank_hinge_loss: pairing must be one of {PAIRINGS}, got {pairing!r}")
    s = ranking.float()
    positive = labels == 1
    negative = _sample_negatives(labels == 0, negatives)
    pos = positive.to(s.dtype)
    neg = negative.to(s.dtype)
    pos_count = pos.sum(dim=1)
    neg_count = neg.sum(dim=1)
    if pairing == "mean":
        pos_mean = (pos * s).sum(dim=1) / pos_count.clamp(min=1)  # [B]
        hinge = F.relu(margin - pos_mean[:, None] + s)  # [B, C]
        per_image = (neg * hinge).sum(dim=1) / neg_count.clamp(min=1)
    else:
        hinge = F.relu(margin - s[:, :, None] + s[:, None, :])  # [B, C (positive), C (negative)]
        pairs = pos[:, :, None] * neg[:, None, :]
        per_image = (pairs * hinge).sum(dim=(1, 2)) / (pos_count * neg_count).clamp(min=1)
    counted = ((pos_count > 0) & (neg_count > 0)).to(s.dtype)
    return (per_image * counted).sum() / counted.sum().clamp(min=1)


class LabelRanking(nn.Module):
    """Backbone, pooled features -> a ``k x d`` matrix ``A`` per image, labels ranked by
    ``||A w||^2`` (see the module docstring).

    Args:
        num_classes: C, >= 1.
        backbone: a ``models.backbones`` backbone (``channels`` attribute; ``forward(images
            Tensor[B, 3, H, W] in [0, 1]) -> Tensor[B, D, h, w]``).
        label_vectors: ``Tensor[C, d]`` float, the classes' fixed label vectors (scaled to unit
            length inside; a row of zeros scores 0).
        rank_dim: k, the rows of ``A``, >= 1.
        margin: m of the hinge loss, > 0.
        negatives: the negatives each image draws in the loss, >= 1.
        pairing: ``"each"`` (every positive against every sampled negative) or ``"mean"`` (the
            positives' mean against each), see :func:`rank_hinge_loss`.
        score: ``"squared"`` (``s = ||A w||^2``) or ``"norm"`` (``s = ||A w||``); the same order.
        vector_source: where the label vectors came from, for :meth:`label_vectors_for`: None
            (the MiniLM name embeddings) or the path of a word-vector file.

    ``forward`` returns a dict: ``"ranking"`` Tensor[B, C] float32 (``s``) and ``"transform"``
    Tensor[B, k, d] (``A``).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        label_vectors: Tensor,
        *,
        rank_dim: int = 100,
        margin: float = 1.0,
        negatives: int = 40,
        pairing: str = "each",
        score: str = "squared",
        vector_source: str | None = None,
    ) -> None:
        super().__init__()
        checks = {
            "num_classes": (num_classes, isinstance(num_classes, int) and num_classes >= 1, ">= 1"),
            "rank_dim": (rank_dim, isinstance(rank_dim, int) and rank_dim >= 1, ">= 1"),
            "margin": (margin, margin > 0, "> 0"),
            "negatives": (negatives, isinstance(negatives, int) and negatives >= 1, ">= 1"),
        }
        for name, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"LabelRanking: {name} must be {expected}, got {value!r}")
        if pairing not in PAIRINGS:
            raise ValueError(f"LabelRanking: pairing must be one of {PAIRINGS}, got {pairing!r}")
        if score not in SCORES:
            raise ValueError(f"LabelRanking: score must be one of {SCORES}, got {score!r}")
        if (
            not isinstance(label_vectors, Tensor)
            or label_vectors.dim() != 2
            or label_vectors.shape[0] != num_classes
            or label_vectors.shape[1] < 1
            or not label_vectors.is_floating_point()
        ):
            got = (
                f"Tensor{list(label_vectors.shape)} {label_vectors.dtype}"
                if isinstance(label_vectors, Tensor)
                else type(label_vectors).__name__
            )
            raise ValueError(
                f"LabelRanking: label_vectors must be a float Tensor[{num_classes}, d], got {got}"
            )
        channels = getattr(backbone, "channels", None)
        if not isinstance(backbone, nn.Module) or not isinstance(channels, int) or channels < 1:
            raise TypeError(
                f"LabelRanking: backbone must be an nn.Module with an int 'channels' attribute (a "
                f"models.backbones backbone), got {type(backbone).__name__} with channels="
                f"{channels!r}"
            )
        self.num_classes = num_classes
        self.rank_dim = int(rank_dim)
        self.vector_dim = int(label_vectors.shape[1])
        self.margin = float(margin)
        self.negatives = int(negatives)
        self.pairing = pairing
        self.score = score
        self.vector_source = vector_source
        self.backbone = backbone
        self.transform = nn.Linear(channels, self.rank_dim * self.vector_dim)
        self.register_buffer("label_vectors", label_vectors.detach().to(torch.float32).clone())

    def extra_repr(self) -> str:
        source = self.vector_source or "label-name embeddings"
        return (
            f"num_classes={self.num_classes}, rank_dim={self.rank_dim}, "
            f"vector_dim={self.vector_dim}, margin={self.margin}, negatives={self.negatives}, "
            f"pairing={self.pairing!r}, score={self.score!r}, "
            f"label_vectors={source!r}"
        )

    def transformation(self, images: Tensor) -> Tensor:
        """``A``: ``images`` Tensor[B, 3, H, W] float in [0, 1] -> Tensor[B, k, d]."""
        pooled = self.backbone(images).mean(dim=(2, 3))  # [B, D]
        return self.transform(pooled).view(-1, self.rank_dim, self.vector_dim)

    def _check_vectors(self, label_vectors: Tensor) -> None:
        if (
            not isinstance(label_vectors, Tensor)
            or label_vectors.dim() != 2
            or label_vectors.shape[1] != self.vector_dim
        ):
            got = (
                f"Tensor{list(label_vectors.shape)}"
                if isinstance(label_vectors, Tensor)
                else type(label_vectors).__name__
            )
            raise ValueError(
                f"LabelRanking.rank: label_vectors must be Tensor[C', {self.vector_dim}], got {got}"
            )

    def _ranking(self, transform: Tensor, label_vectors: Tensor) -> Tensor:
        """``||A_i w_c||^2`` (or ``||A_i w_c||``, ``score="norm"``) with ``w_c`` the unit-length
        rows: Tensor[B, k, d] x Tensor[C, d] -> Tensor[B, C] float32."""
        unit = F.normalize(label_vectors.to(transform.dtype), dim=1)
        projected = torch.einsum("bkd,cd->bkc", transform, unit)  # [B, k, C]
        squared = projected.float().square().sum(dim=1)
        if self.score == "norm":
            return (squared + 1e-8).sqrt()  # finite gradient where A w = 0
        return squared

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images`` Tensor[B, 3, H, W] float in [0, 1] -> the dict of outputs (class doc)."""
        transform = self.transformation(images)
        return {
            "ranking": self._ranking(transform, self.label_vectors),
            "transform": transform,
        }

    def rank(self, images: Tensor, label_vectors: Tensor) -> Tensor:
        """The ranking scores ``||A w||^2`` of any label vectors: Tensor[B, C'] float32.

        Args:
            images: ``Tensor[B, 3, H, W]`` float in [0, 1].
            label_vectors: ``Tensor[C', d]``, e.g. :meth:`label_vectors_for` of names never
                seen in training (zero-shot); scaled to unit length as in training.

        For the model's own label vectors this is ``forward(images)["ranking"]``, whose
        monotone map :meth:`scores` is: the same order.
        """
        self._check_vectors(label_vectors)
        return self._ranking(self.transformation(images), label_vectors)

    def label_vectors_for(self, names: Sequence[str]) -> Tensor:
        """The label vectors of any class names from the training source: Tensor[len(names), d]
        float32 on the model's device (MiniLM name embeddings, or the same word-vector file)."""
        names = list(names)
        if self.vector_source is None:
            from .label_embeddings import label_name_embeddings

            vectors = label_name_embeddings(names)
        else:
            vectors = read_label_vectors(self.vector_source, names)
        if vectors.shape[1] != self.vector_dim:
            raise ValueError(
                f"LabelRanking.label_vectors_for: the source gives {vectors.shape[1]}-dim "
                f"vectors, the model was trained with {self.vector_dim}"
            )
        return vectors.to(self.label_vectors.device)

    def loss(self, outputs: dict[str, Tensor], batch: dict) -> Tensor:
        """The hinge rank loss (:func:`rank_hinge_loss`) of ``outputs["ranking"]``: Tensor[]."""
        return rank_hinge_loss(
            outputs["ranking"], batch["labels"], self.margin, self.negatives, self.pairing
        )

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """``sigmoid(4 (s - m / 2) / m)``: Tensor[B, C] in [0, 1], float32, monotone in ``s``."""
        s = outputs["ranking"].float()
        return torch.sigmoid((s - self.margin / 2) * (4.0 / self.margin))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The label-ranking model's own options."""
    group = parser.add_argument_group("label_ranking model")
    group.add_argument("--rank-dim", type=int, default=100, help="k, the rows of A (k x d)")
    group.add_argument("--rank-margin", type=float, default=1.0, help="margin of the hinge loss")
    group.add_argument(
        "--rank-negatives", type=int, default=40, help="negatives sampled per image in the loss"
    )
    group.add_argument(
        "--rank-pairing",
        choices=PAIRINGS,
        default="each",
        help="hinge pairs: every positive vs each negative, or the positives' mean vs each",
    )
    group.add_argument(
        "--rank-score",
        choices=SCORES,
        default="squared",
        help="ranking score: the squared norm ||A w||^2 or the norm ||A w||",
    )
    group.add_argument(
        "--label-vectors",
        default=None,
        metavar="PATH",
        help="a GloVe/word2vec text file of word vectors (default: MiniLM label-name embeddings)",
    )


def build_label_ranking(
    num_classes: int, backbone: nn.Module, args: argparse.Namespace
) -> LabelRanking:
    """The registry builder of :class:`LabelRanking`: label vectors from ``--label-vectors`` or
    the MiniLM embeddings of ``args.class_names``.

    When the class names are unknown (e.g. ``models.predict`` on a machine without the dataset) it
    warns and starts with zero label vectors of the source's size; loading a checkpoint's state
    dict restores them.

    Raises:
        ValueError: ``--label-vectors`` cannot be read or lacks a word of a class name.
    """
    from .cmsg import class_names_of
    from .label_embeddings import EMBEDDING_DIM, label_name_embeddings

    path = getattr(args, "label_vectors", None)
    names = class_names_of(args, num_classes)
    if names is None:
        warnings.warn(
            f"build_label_ranking: the {num_classes} class names of --data "
            f"{getattr(args, 'data', None)!r} are unknown; the label vectors start at zero "
            "(loading a checkpoint's state dict restores them)",
            stacklevel=2,
        )
        vectors = torch.zeros(num_classes, EMBEDDING_DIM if path is None else _vector_size(path))
    elif path is not None:
        try:
            vectors = read_label_vectors(path, names)
        except OSError as error:
            raise ValueError(f"--label-vectors: cannot read {path}: {error.strerror}") from None
        except ValueError as error:
            raise ValueError(f"--label-vectors: {error}") from None
    else:
        vectors = label_name_embeddings(names)
    return LabelRanking(
        num_classes,
        backbone,
        vectors,
        rank_dim=getattr(args, "rank_dim", 100),
        margin=getattr(args, "rank_margin", 1.0),
        negatives=getattr(args, "rank_negatives", 40),
        pairing=getattr(args, "rank_pairing", "each"),
        score=getattr(args, "rank_score", "squared"),
        vector_source=None if path is None else str(path),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m models.label_ranking --checkpoint CKPT IMAGE... [--labels a,b,c] [--top-k 5]``:
    each image's labels ranked by ``||A w||^2``, the trained classes or any names (zero-shot)."""
    from .checkpoint import CheckpointError
    from .predict import PredictError, image_batch, load_model, read_image

    parser = argparse.ArgumentParser(
        prog="models.label_ranking",
        description="Rank labels (the trained classes or any names) for images.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of --model label_ranking")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--labels", default=None, help="comma-separated names (default: classes)")
    parser.add_argument("--top-k", type=int, default=5, help="labels printed per image")
    args = parser.parse_args(argv)
    try:
        model, class_names, image_size = load_model(args.checkpoint)
        if not isinstance(model, LabelRanking):
            raise PredictError(
                f"checkpoint {args.checkpoint} holds a {type(model).__name__}, not a "
                "LabelRanking model"
            )
        if args.labels is None:
            names, vectors = class_names, model.label_vectors
        else:
            names = [n.strip() for n in args.labels.split(",") if n.strip()]
            vectors = model.label_vectors_for(names)
        images = image_batch([read_image(image) for image in args.images], image_size)
        with torch.no_grad():
            ranking = model.rank(images, vectors)
    except (CheckpointError, PredictError, ValueError, OSError) as error:
        print(f"models.label_ranking: error: {error}", file=sys.stderr)
        return 2
    top_k = max(1, min(args.top_k, len(names)))
    for path, row in zip(args.images, ranking, strict=True):
        order = row.argsort(descending=True)[:top_k].tolist()
        print(f"{path}: " + ", ".join(f"{names[c]} {row[c]:.3f}" for c in order))
    return 0


if __name__ == "__main__":
    # Run as ``python -m models.label_ranking``: this file is then ``__main__``, a second copy of
    # the module; the importable ``models.label_ranking`` registers the model.
    from models.label_ranking import main as module_main

    sys.exit(module_main())
else:
    register_model("label_ranking", add_arguments)(build_label_ranking)
