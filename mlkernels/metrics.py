"""Multi-label evaluation metrics: average precision (three definitions), CP/CR/CF1/OP/OR/OF1 at
a score threshold and at top-k, recall by object size, and one class's precision-recall curve.

Pure PyTorch (no scikit-learn at run time), vectorized: one sort per call and cumulative sums,
gathers and scatters over ``[C, N]``; no Python loop over samples or classes (only over the few
object-size bins). Scores are compared exactly in their own precision (float32-valued scores sorted
as float32 keys, others as float64; thresholds compared in float64) and every count and ratio is
float64, on the inputs' device: a float32 tensor and its float64 copy give identical results.

Speed, 40,000 x 80 float32 scores (5% positives), one CPU thread, torch 2.14, on the project's
2-core AMD EPYC development machine while shared with other jobs (so upper bounds):
:func:`average_precision` 0.16-0.26 s ("step", "rank" or "voc"), :func:`evaluate` (AP, the
threshold and top-3 metrics) 0.35-0.40 s; float64 scores that are not float32 values (sorted as
rows of float64, not as one int64 key) 0.55 s.

Inputs everywhere: ``scores`` (``Tensor[N, C]``, any real dtype, any device; higher = more
confident; NaN is refused) and ``targets`` (``Tensor[N, C]``, same device, any dtype, values 1 for
a positive, 0 for a negative, -1 "ignore": that sample is left out for that class only, as VOC's
"difficult" images are). ``models.data``'s ``"labels"`` are in this format. N = 0 is allowed.

Definitions (``P``: precision, ``R``: recall):

- **"step" AP** (the default): ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score values
  ``n`` taken as thresholds in decreasing order (``score >= threshold`` predicts positive; tied
  scores form one threshold). This is scikit-learn's ``average_precision_score`` and torchmetrics'
  ``MultilabelAveragePrecision(average=None)``; equivalently, the mean over the positives of the
  precision at the threshold of their score. Independent of sample order.
- **"rank" AP**: the AP of the multi-label recognition code of ML-GCN (Chen et al., CVPR 2019,
  ``util.py``, ``AveragePrecisionMeter.average_precision``, itself from torchnet's ``APMeter``)
  and ASL (Ridnik et al., ICCV 2021, ``helper_functions.py``, ``average_precision``): sort the
  samples by score, descending; at each positive's rank ``r`` take the precision of the top
  ``r`` (positives among the first ``r`` / ``r``); average over the positives. Tied scores are
  ranked by a stable sort, i.e. by sample index, lower first (those codes leave ties to
  ``torch.sort``/``numpy.argsort``, which are not stable, so their result on ties is arbitrary).
  Equal to "step" when no two samples of a class tie.
- **"voc" AP**: PASCAL VOC 2010+ all-point interpolated AP (Everingham et al., the VOC 2012
  development kit, ``VOCap.m``): the precision-recall points of the thresholds above (with
  ``(0, 0)`` and ``(R=1, P=0)`` added), precision made monotone from the right
  (``P_interp(R) = max_{R' >= R} P(R')``), and the area under that curve. VOC's classification
  code ranks tied scores one by one in sort order; here tied scores form one threshold, as in
  "step", so the result does not depend on sample order (the two agree without ties).
- **CP, CR** (per-class precision and recall, mean over classes), **CF1** ``= 2 CP CR / (CP +
  CR)``, the harmonic mean of CP and CR (not the mean of per-class F1s), and **OP, OR, OF1**
  (precision, recall and F1 of the counts summed over all classes), as defined in CNN-RNN (Wang
  et al., CVPR 2016), SRN (Zhu et al., CVPR 2017) and ML-GCN. A class with no prediction has
  precision 0 (scikit-learn's ``zero_division=0``); an F1 of a zero precision and recall is 0.

Classes without a positive (after ignoring -1 entries): AP is NaN; they are left out of every mean
over classes (mAP, CP, CR) and counted in ``classes_without_positives``. Their predictions still
count in OP: each one is a false positive (OP is over all classes, as scikit-learn's
``average="micro"``); they add nothing to OR. A mean over no class, and OR without any positive,
are NaN (so are the F1s made from them). Ignored (-1) entries are left out of every count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .ops._checks import ShapeError, shape_str

__all__ = [
    "MultiLabelMetrics",
    "average_precision",
    "best_threshold",
    "evaluate",
    "mean_average_precision",
    "precision_recall_curve",
    "recall_by_object_size",
    "small_object_average_precision",
    "threshold_metrics",
    "top_k_metrics",
]

APMethod = Literal["step", "rank", "voc"]
_METHODS = ("step", "rank", "voc")
_METRIC_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
_OBJECT_KEYS = ("image", "class", "area_fraction")


# ---- input checks -------------------------------------------------------------------------------


def _check_scores(fn: str, scores: object, dim: int) -> Tensor:
    """``scores`` (detached, its own dtype) after checking its type, rank, dtype and NaN."""
    expected = "Tensor[N, C]" if dim == 2 else "Tensor[N]"
    if not isinstance(scores, Tensor):
        raise TypeError(f"{fn}: scores must be a {expected}, got {type(scores).__name__}")
    if scores.dim() != dim:
        raise ShapeError(f"{fn}: scores must be a {expected}, got {shape_str(scores)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"{fn}: scores must have a real dtype, got {scores.dtype}")
    scores = scores.detach()
    if scores.is_floating_point():
        nans = int(torch.count_nonzero(torch.isnan(scores)))
        if nans:
            raise ValueError(f"{fn}: scores must not contain NaN, got {nans} NaN value(s)")
    return scores


def _check_targets(fn: str, targets: object, scores: Tensor) -> Tensor:
    """``targets`` as int8 in {-1, 0, 1}, after checking its type, shape, device and values."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"{fn}: targets must be a Tensor, got {type(targets).__name__}")
    if targets.shape != scores.shape:
        raise ShapeError(
            f"{fn}: targets must have the shape of scores, {shape_str(scores)}, "
            f"got {shape_str(targets)}"
        )
    if targets.device != scores.device:
        raise ValueError(
            f"{fn}: targets must be on the device of scores, {scores.device}, got {targets.device}"
        )
    if targets.is_complex():
        raise TypeError(f"{fn}: targets must have a real dtype, got {targets.dtype}")
    targets = targets.detach()
    bad = ~((targets == 1) | (targets == 0) | (targets == -1))
    if bool(bad.any()):
        value = targets[bad][0].item()
        raise ValueError(f"{fn}: targets must have values in {{-1, 0, 1}}, got {value}")
    return targets.to(torch.int8)


def _check_inputs(fn: str, scores: object, targets: object, dim: int = 2) -> tuple[Tensor, Tensor]:
    scores = _check_scores(fn, scores, dim)
    return scores, _check_targets(fn, targets, scores)


def _check_threshold(fn: str, threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{fn}: threshold must be a float, got {type(threshold).__name__}")
    if math.isnan(threshold):
        raise ValueError(f"{fn}: threshold must not be NaN, got nan")
    return float(threshold)


def _check_k(fn: str, arg: str, k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: {arg} must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{fn}: {arg} must be >= 1, got {k}")
    return k


def _check_method(fn: str, method: object) -> str:
    if method not in _METHODS:
        raise ValueError(f"{fn}: method must be one of 'step', 'rank', 'voc', got {method!r}")
    return method  # type: ignore[return-value]


# ---- average precision --------------------------------------------------------------------------


def _float32_exact(scores: Tensor) -> Tensor | None:
    """``scores`` as float32 when that changes no value (float16/bfloat16/float32 always, float64
    when every value is a float32), else None."""
    if scores.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return scores.to(torch.float32)
    if scores.dtype == torch.float64:
        as_float32 = scores.to(torch.float32)
        if torch.equal(as_float32.to(torch.float64), scores):
            return as_float32
    return None


def _sorted_by_class(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Each class's scores sorted descending (stable: ties by sample index) and its targets in
    that order, as ``Tensor[C, N]`` each (the scores in float32 or float64, exact).

    Float32 scores (the usual case) are sorted as one int64 key per entry, the class index in the
    high 32 bits and the score's bits mapped to an unsigned order in the low ones: one stable 1-D
    sort of integers (a radix sort on the CPU and the GPU), about twice as fast as sorting the
    ``C`` rows of floats, which other dtypes use.
    """
    num_samples, num_classes = scores.shape
    targets_by_class = targets.t().contiguous()
    scores32 = _float32_exact(scores)
    if scores32 is None:
        by_class = scores.to(torch.float64).t().contiguous()
        sorted_scores, order = torch.sort(by_class, dim=1, descending=True, stable=True)
        return sorted_scores, torch.gather(targets_by_class, 1, order)
    by_class = scores32.t().contiguous() + 0.0  # -0.0 becomes 0.0: equal scores, equal keys
    bits = by_class.view(torch.int32).to(torch.int64)
    # The floats' order as unsigned 32-bit integers: negatives (sign bit set) reversed below
    # 2**31, non-negatives above it; then reversed again, for descending scores.
    ascending = torch.where(bits < 0, -1 - bits, bits + 2**31)
    key = (2**32 - 1) - ascending
    classes = torch.arange(num_classes, device=scores.device, dtype=torch.int64)
    key += (classes << 32).unsqueeze(1)
    flat_order = torch.sort(key.flatten(), stable=True).indices
    sorted_scores = torch.index_select(by_class.flatten(), 0, flat_order)
    sorted_targets = torch.index_select(targets_by_class.flatten(), 0, flat_order)
    shape = (num_classes, num_samples)
    return sorted_scores.view(shape), sorted_targets.view(shape)


def _threshold_ends(sorted_scores: Tensor) -> tuple[Tensor, Tensor]:
    """For ``sorted_scores`` ``Tensor[C, N]`` (descending per row): ``is_end`` (bool, the last
    position of each run of equal scores, i.e. of each threshold) and ``end`` (int64, for every
    position the last position of its run), both ``Tensor[C, N]``."""
    num_classes, n = sorted_scores.shape
    is_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    is_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    positions = torch.arange(n, device=sorted_scores.device).expand(num_classes, n)
    # The next end at or after each position: a running minimum from the right.
    end_or_n = torch.where(is_end, positions, n)
    end = torch.flip(torch.cummin(torch.flip(end_or_n, [1]), dim=1).values, [1])
    return is_end, end


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, 0 where ``denominator`` is 0."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), 0.0)


def _average_precision(scores: Tensor, targets: Tensor, method: str) -> Tensor:
    """AP per class of checked inputs (``Tensor[N, C]`` scores of any real dtype, int8 targets)."""
    sorted_scores, sorted_targets = _sorted_by_class(scores, targets)
    positive = sorted_targets == 1
    true_positives = torch.cumsum(positive, dim=1, dtype=torch.float64)
    num_positives = torch.count_nonzero(positive, dim=1)
    if method == "rank":
        # Precision of the top r at each rank r, ranks counting non-ignored samples only.
        ranks = torch.cumsum(sorted_targets != -1, dim=1, dtype=torch.float64)
        precision = _safe_divide(true_positives, ranks)
    else:
        # Precision at each position's threshold (the end of its run of tied scores).
        is_end, end = _threshold_ends(sorted_scores)
        false_positives = torch.cumsum(sorted_targets == 0, dim=1, dtype=torch.float64)
        precision = _safe_divide(true_positives, true_positives + false_positives)
        if method == "voc":
            # The precision envelope: the maximum over this threshold and all lower ones.
            at_ends = torch.where(is_end, precision, 0.0)
            precision = torch.flip(torch.cummax(torch.flip(at_ends, [1]), dim=1).values, [1])
        precision = torch.gather(precision, 1, end)
    # The mean over the positives; 0 / 0 = NaN for a class without positives.
    return torch.where(positive, precision, 0.0).sum(dim=1) / num_positives


def average_precision(scores: Tensor, targets: Tensor, *, method: APMethod = "step") -> Tensor:
    """Average precision of each class.

    Args:
        scores: ``Tensor[N, C]``, any real dtype and device; higher is more confident.
        targets: ``Tensor[N, C]``, values 1 (positive), 0 (negative), -1 (ignored for that class).
        method: ``"step"`` (scikit-learn's ``average_precision_score``), ``"rank"`` (ML-GCN's and
            ASL's, ties ranked by sample index) or ``"voc"`` (VOC 2010+ all-point interpolated);
            see the module docstring for the exact definitions.

    Returns:
        ``Tensor[C]`` float64 on the device of ``scores``; NaN for a class without positives.
    """
    fn = "average_precision"
    method = _check_method(fn, method)
    scores, targets = _check_inputs(fn, scores, targets)
    return _average_precision(scores, targets, method)


def mean_average_precision(scores: Tensor, targets: Tensor, *, method: APMethod = "step") -> float:
    """mAP: the mean of :func:`average_precision` over the classes with at least one positive
    (NaN when no class has one). Arguments as for :func:`average_precision`."""
    fn = "mean_average_precision"
    method = _check_method(fn, method)
    scores, targets = _check_inputs(fn, scores, targets)
    return _nan_mean(_average_precision(scores, targets, method))


def _nan_mean(values: Tensor) -> float:
    """The mean of the non-NaN values as a float; NaN when there are none."""
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else math.nan


# ---- threshold and top-k metrics ----------------------------------------------------------------


def _harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)``; 0 when both are 0, NaN when either is."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def _counting_metrics(predicted: Tensor, targets: Tensor) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 of the boolean ``predicted`` ``Tensor[N, C]``."""
    positive = targets == 1
    counted = targets != -1
    true_positives = torch.count_nonzero(predicted & positive, dim=0).to(torch.float64)
    num_predicted = torch.count_nonzero(predicted & counted, dim=0).to(torch.float64)
    num_positives = torch.count_nonzero(positive, dim=0).to(torch.float64)
    has_positives = num_positives > 0
    precision = _safe_divide(true_positives, num_predicted)
    recall = _safe_divide(true_positives, num_positives)
    cp = float(precision[has_positives].mean()) if bool(has_positives.any()) else math.nan
    cr = float(recall[has_positives].mean()) if bool(has_positives.any()) else math.nan
    total_true_positives = float(true_positives.sum())
    total_predicted = float(num_predicted.sum())
    total_positives = float(num_positives.sum())
    op = total_true_positives / total_predicted if total_predicted > 0 else 0.0
    orr = total_true_positives / total_positives if total_positives > 0 else math.nan
    return {
        "CP": cp,
        "CR": cr,
        "CF1": _harmonic_mean(cp, cr),
        "OP": op,
        "OR": orr,
        "OF1": _harmonic_mean(op, orr),
    }


def _predicted_at_threshold(scores: Tensor, threshold: float) -> Tensor:
    """``scores >= threshold`` compared in float64 (a float32 tensor would round the threshold)."""
    return scores.to(torch.float64) >= threshold


def _predicted_top_k(scores: Tensor, k: int) -> Tensor:
    """The ``k`` highest scores of each row (ties: lower class index first) as a bool mask."""
    k = min(k, scores.shape[1])
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above = scores > kth
    at_kth = scores == kth
    # The scores equal to the k-th fill the slots left by those above it, in class order.
    slots = k - torch.count_nonzero(above, dim=1).unsqueeze(1)
    return above | (at_kth & (torch.cumsum(at_kth, dim=1) <= slots))


def threshold_metrics(
    scores: Tensor, targets: Tensor, *, threshold: float = 0.5
) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 with ``scores >= threshold`` predicted positive.

    Args:
        scores: ``Tensor[N, C]`` (probabilities for the default ``threshold`` 0.5; pass 0.0 for
            logits).
        targets: ``Tensor[N, C]`` in {-1, 0, 1}; -1 entries are left out of every count.
        threshold: the score from which a class is predicted (inclusive).

    Returns:
        ``{"CP", "CR", "CF1", "OP", "OR", "OF1"}`` floats in [0, 1] (or NaN), as defined in the
        module docstring: CP and CR are means over the classes with positives, CF1 their harmonic
        mean, OP/OR/OF1 from the counts of all classes.
    """
    fn = "threshold_metrics"
    threshold = _check_threshold(fn, threshold)
    scores, targets = _check_inputs(fn, scores, targets)
    return _counting_metrics(_predicted_at_threshold(scores, threshold), targets)


def best_threshold(
    scores: Tensor,
    targets: Tensor,
    *,
    metric: str = "CF1",
    candidates: Sequence[float] | Tensor | None = None,
) -> float:
    """The threshold at which ``metric`` of :func:`threshold_metrics` is highest (choose it on a
    validation split, then apply it to the test split).

    Args:
        scores: ``Tensor[N, C]``; targets: ``Tensor[N, C]`` in {-1, 0, 1}.
        metric: one of "CP", "CR", "CF1", "OP", "OR", "OF1".
        candidates: the thresholds tried; default the 99 values 0.01, 0.02, ..., 0.99.

    Returns:
        The best candidate; on ties (and where every value is NaN) the lowest such candidate.
    """
    fn = "best_threshold"
    if metric not in _METRIC_KEYS:
        raise ValueError(f"{fn}: metric must be one of {_METRIC_KEYS}, got {metric!r}")
    scores, targets = _check_inputs(fn, scores, targets)
    if candidates is None:
        candidates = [i / 100 for i in range(1, 100)]
    values = [_check_threshold(fn, float(c)) for c in candidates]
    if not values:
        raise ValueError(f"{fn}: candidates must not be empty")
    best, best_value = values[0], -math.inf
    for threshold in sorted(values):
        value = _counting_metrics(_predicted_at_threshold(scores, threshold), targets)[metric]
        if value > best_value:  # NaN never wins
            best, best_value = threshold, value
    return best


def top_k_metrics(scores: Tensor, targets: Tensor, *, k: int = 3) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 with each sample's ``k`` highest scores predicted positive.

    Tied scores are taken in class order (lower index first); ``k > C`` predicts every class.
    Selection is over all classes, ignored (-1) ones included, which are then left out of the
    counts. No score threshold applies (ML-GCN's ``overall_topk`` additionally requires a
    positive logit; this one does not). Keys and definitions as for :func:`threshold_metrics`.
    """
    fn = "top_k_metrics"
    k = _check_k(fn, "k", k)
    scores, targets = _check_inputs(fn, scores, targets)
    return _counting_metrics(_predicted_top_k(scores, k), targets)


# ---- recall by object size ----------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:g}"


def _bin_labels(bins: Sequence[float]) -> list[str]:
    """``(0.0, 0.01, 0.1, 1.0)`` -> ``["small (<1%)", "medium (1-10%)", "large (>=10%)"]``."""
    count = len(bins) - 1
    names = {1: ["all"], 2: ["small", "large"], 3: ["small", "medium", "large"]}.get(
        count, [f"size {i}" for i in range(count)]
    )
    labels = []
    for i, (low, high) in enumerate(zip(bins[:-1], bins[1:], strict=True)):
        if i == 0 and low <= 0 and count > 1:
            span = f"<{_percent(high)}%"
        elif i == count - 1 and high >= 1 and count > 1:
            span = f">={_percent(low)}%"
        else:
            span = f"{_percent(low)}-{_percent(high)}%"
        labels.append(f"{names[i]} ({span})")
    return labels


def _check_bins(fn: str, bins: object) -> list[float]:
    try:
        edges = [float(b) for b in bins]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: bins must be a sequence of floats, got {bins!r}") from None
    if len(edges) < 2 or any(math.isnan(b) for b in edges):
        raise ValueError(f"{fn}: bins must be at least 2 edges, not NaN, got {bins!r}")
    if any(high <= low for low, high in zip(edges[:-1], edges[1:], strict=True)):
        raise ValueError(f"{fn}: bins must be strictly increasing, got {bins!r}")
    return edges


def _check_objects(fn: str, objects: object, shape: torch.Size, device: torch.device):
    """``objects``' three tensors on ``device`` (int64, int64, float64), after checking them."""
    if not isinstance(objects, Mapping):
        raise TypeError(
            f"{fn}: objects must be a dict with keys 'image', 'class', 'area_fraction', "
            f"got {type(objects).__name__}"
        )
    missing = [key for key in _OBJECT_KEYS if key not in objects]
    if missing:
        raise ValueError(
            f"{fn}: objects must have keys 'image', 'class', 'area_fraction', missing {missing}"
        )
    tensors = []
    for key in _OBJECT_KEYS:
        value = objects[key]
        if not isinstance(value, Tensor) or value.dim() != 1:
            got = shape_str(value) if isinstance(value, Tensor) else type(value).__name__
            raise ShapeError(f"{fn}: objects[{key!r}] must be a Tensor[M], got {got}")
        tensors.append(value.detach().to(device))
    image, cls, area = tensors
    if not image.shape == cls.shape == area.shape:
        raise ShapeError(
            f"{fn}: objects' tensors must have one length M, got image {shape_str(image)}, "
            f"class {shape_str(cls)}, area_fraction {shape_str(area)}"
        )
    for key, value, size in (("image", image, shape[0]), ("class", cls, shape[1])):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{fn}: objects[{key!r}] must be an integer tensor, got {value.dtype}")
        outside = (value < 0) | (value >= size)
        if bool(outside.any()):
            raise ValueError(
                f"{fn}: objects[{key!r}] must be in [0, {size}), got {int(value[outside][0])}"
            )
    if not area.is_floating_point():
        raise TypeError(f"{fn}: objects['area_fraction'] must be a float tensor, got {area.dtype}")
    area = area.to(torch.float64)
    if bool(torch.isnan(area).any()):
        raise ValueError(f"{fn}: objects['area_fraction'] must not contain NaN")
    return image.to(torch.int64), cls.to(torch.int64), area


def _recall_by_size(
    predicted: Tensor, targets: Tensor, image: Tensor, cls: Tensor, area: Tensor, bins: list[float]
) -> dict[str, dict]:
    counted = targets[image, cls] != -1
    recalled = predicted[image, cls] & counted
    result = {}
    last = len(bins) - 2
    for i, label in enumerate(_bin_labels(bins)):
        low, high = bins[i], bins[i + 1]
        in_bin = counted & (area >= low) & ((area <= high) if i == last else (area < high))
        count = int(in_bin.sum())
        recall = int((recalled & in_bin).sum()) / count if count else math.nan
        result[label] = {"recall": recall, "objects": count}
    return result


def recall_by_object_size(
    scores: Tensor,
    targets: Tensor,
    objects: dict[str, Tensor],
    *,
    threshold: float | None = 0.5,
    top_k: int | None = None,
    bins: Sequence[float] = (0.0, 0.01, 0.1, 1.0),
) -> dict[str, dict]:
    """The fraction of objects whose class is predicted for their image, per object-size bin.

    An image-level classifier has no boxes: an object counts as recalled when its class is
    predicted for its image (so two objects of one class in one image are both recalled or both
    missed). This shows whether small objects' classes are the ones missed.

    Args:
        scores: ``Tensor[N, C]``.
        targets: ``Tensor[N, C]`` in {-1, 0, 1}; objects whose (image, class) target is -1
            (ignored) are left out.
        objects: ``{"image": Tensor[M] int sample index, "class": Tensor[M] int class index,
            "area_fraction": Tensor[M] float box area / image area}`` (``models.data``'s
            ``dataset.objects``).
        threshold: predict ``scores >= threshold``; used when ``top_k`` is None.
        top_k: predict each image's ``top_k`` highest scores (as :func:`top_k_metrics`); when
            given, ``threshold`` is not used.
        bins: increasing area-fraction edges; bin i holds ``bins[i] <= area < bins[i + 1]`` (the
            last bin includes its upper edge); objects outside ``[bins[0], bins[-1]]`` are in no
            bin.

    Returns:
        For each bin, by label (the default bins: ``"small (<1%)"``, ``"medium (1-10%)"``,
        ``"large (>=10%)"``), ``{"recall": float (NaN without objects), "objects": int}``.
    """
    fn = "recall_by_object_size"
    if top_k is not None:
        top_k = _check_k(fn, "top_k", top_k)
    elif threshold is None:
        raise ValueError(f"{fn}: threshold or top_k must be given, got None for both")
    else:
        threshold = _check_threshold(fn, threshold)
    edges = _check_bins(fn, bins)
    scores, targets = _check_inputs(fn, scores, targets)
    image, cls, area = _check_objects(fn, objects, scores.shape, scores.device)
    if top_k is not None:
        predicted = _predicted_top_k(scores, top_k)
    else:
        predicted = _predicted_at_threshold(scores, threshold)  # type: ignore[arg-type]
    return _recall_by_size(predicted, targets, image, cls, area, edges)


def _small_object_targets(targets: Tensor, image: Tensor, cls: Tensor, area: Tensor, max_area):
    """``targets`` with every positive that is not made only of small objects set to -1."""
    has_object = torch.zeros_like(targets, dtype=torch.bool)
    has_object[image, cls] = True
    has_large = torch.zeros_like(has_object)
    large = area >= max_area
    has_large[image[large], cls[large]] = True
    return targets.masked_fill((targets == 1) & (has_large | ~has_object), -1)


def small_object_average_precision(
    scores: Tensor,
    targets: Tensor,
    objects: dict[str, Tensor],
    *,
    method: APMethod = "step",
    max_area: float = 0.01,
) -> Tensor:
    """Each class's AP on small objects: its positives are the images where every object of the
    class is smaller than ``max_area`` of the image; the images where it has a larger object (or
    is labelled without any object recorded) are left out for that class; negatives stay.

    An image-level classifier has no per-object scores, so this is the image-level reading of
    "AP on small objects": how well it ranks images whose only evidence for a class is small.

    Args:
        scores: ``Tensor[N, C]``; targets: ``Tensor[N, C]`` in {-1, 0, 1}.
        objects: as for :func:`recall_by_object_size`.
        method: the AP definition, as for :func:`average_precision`.
        max_area: the area fraction below which an object is small (default 1%, the scenes
            benchmark's "small").

    Returns:
        ``Tensor[C]`` float64; NaN for a class without an image of only small objects.
    """
    fn = "small_object_average_precision"
    method = _check_method(fn, method)
    max_area = _check_threshold(fn, max_area)
    scores, targets = _check_inputs(fn, scores, targets)
    image, cls, area = _check_objects(fn, objects, scores.shape, scores.device)
    small = _small_object_targets(targets, image, cls, area, max_area)
    return _average_precision(scores, small, method)


# ---- everything at once -------------------------------------------------------------------------


def _format_percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


@dataclass
class MultiLabelMetrics:
    """The results of :func:`evaluate`. Every metric is a fraction in [0, 1] (or NaN).

    Attributes:
        mAP: mean AP over the classes with positives.
        ap: ``Tensor[C]`` float64, each class's AP (NaN without positives).
        CP, CR, CF1, OP, OR, OF1: at ``scores >= threshold``.
        topk: the same six keys with each sample's ``k`` highest scores predicted (None when
            :func:`evaluate` got ``top_k=None``).
        k: the ``k`` of ``topk`` (None with it).
        classes_without_positives: classes left out of mAP, CP and CR for having no positive.
        recall_by_size: :func:`recall_by_object_size` at ``threshold`` (None without objects).
        method: the AP definition (``"step"``, ``"rank"`` or ``"voc"``).
        threshold: the score threshold of CP..OF1 and recall_by_size.
        mAP_small: mean of :func:`small_object_average_precision` over the classes it defines
            (None without objects; NaN when no class has an image of only small objects).
    """

    mAP: float
    ap: Tensor
    CP: float
    CR: float
    CF1: float
    OP: float
    OR: float
    OF1: float
    topk: dict[str, float] | None
    k: int | None
    classes_without_positives: int
    recall_by_size: dict[str, dict] | None
    method: str
    threshold: float
    mAP_small: float | None = None

    def as_dict(self) -> dict:
        """The fields as plain Python (``ap`` a list of floats): ``json.dumps`` takes it (NaN is
        written as ``NaN``)."""
        return {
            "mAP": self.mAP,
            "ap": self.ap.tolist(),
            **{key: getattr(self, key) for key in _METRIC_KEYS},
            "topk": None if self.topk is None else dict(self.topk),
            "k": self.k,
            "classes_without_positives": self.classes_without_positives,
            "recall_by_size": None
            if self.recall_by_size is None
            else {label: dict(entry) for label, entry in self.recall_by_size.items()},
            "method": self.method,
            "threshold": self.threshold,
            "mAP_small": self.mAP_small,
        }

    def to_json(self) -> str:
        """:meth:`as_dict` as a JSON string."""
        return json.dumps(self.as_dict())

    def markdown_table(self, class_names: Sequence[str] | None = None) -> str:
        """Markdown tables, in percent: mAP and CP..OF1 at the threshold and at top-k, recall by
        object size when there are objects, and each class's AP when ``class_names`` (one per
        class, in order) is given."""
        num_classes = self.ap.shape[0]
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"MultiLabelMetrics.markdown_table: class_names must have {num_classes} names "
                f"(one per class), got {len(class_names)}"
            )
        header = "| predicted | mAP | " + " | ".join(_METRIC_KEYS) + " |"
        lines = [header, "|---" * (2 + len(_METRIC_KEYS)) + "|"]
        row = [f"score >= {self.threshold:g}", _format_percent(self.mAP)]
        row += [_format_percent(getattr(self, key)) for key in _METRIC_KEYS]
        lines.append("| " + " | ".join(row) + " |")
        if self.topk is not None:
            row = [f"top-{self.k}", ""] + [_format_percent(self.topk[key]) for key in _METRIC_KEYS]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append(
            f"In percent. AP: {self.method!r}; {num_classes} classes, "
            f"{self.classes_without_positives} "
            "without positives (left out of mAP, CP, CR)."
        )
        if self.mAP_small is not None:
            lines.append(
                f"mAP on small objects (images where each object of the class is under 1% of "
                f"the image): {_format_percent(self.mAP_small)}."
            )
        if self.recall_by_size is not None and any(
            entry["objects"] for entry in self.recall_by_size.values()
        ):
            lines += ["", f"| object size (score >= {self.threshold:g}) | objects | recall |"]
            lines.append("|---|---|---|")
            for label, entry in self.recall_by_size.items():
                recall = _format_percent(entry["recall"])
                lines.append(f"| {label} | {entry['objects']} | {recall} |")
        if class_names is not None:
            lines += ["", "| class | AP |", "|---|---|"]
            for name, value in zip(class_names, self.ap.tolist(), strict=True):
                escaped = str(name).replace("|", "\\|")  # a "|" in a name would split its cell
                lines.append(f"| {escaped} | {_format_percent(value)} |")
        return "\n".join(lines) + "\n"


def evaluate(
    scores: Tensor,
    targets: Tensor,
    *,
    method: APMethod = "step",
    threshold: float = 0.5,
    top_k: int | None = 3,
    objects: dict[str, Tensor] | None = None,
) -> MultiLabelMetrics:
    """All the metrics of this module at once.

    Args:
        scores: ``Tensor[N, C]``; targets: ``Tensor[N, C]`` in {-1, 0, 1}.
        method: the AP definition, as for :func:`average_precision`.
        threshold: the score threshold of CP..OF1 and of the recall by object size.
        top_k: the ``k`` of the top-k metrics; None skips them.
        objects: ``models.data``'s ``dataset.objects`` for :func:`recall_by_object_size` (default
            bins) and :func:`small_object_average_precision` (``mAP_small``); None, or no
            objects at all, leaves ``recall_by_size`` and ``mAP_small`` None.
    """
    fn = "evaluate"
    method = _check_method(fn, method)
    threshold = _check_threshold(fn, threshold)
    if top_k is not None:
        top_k = _check_k(fn, "top_k", top_k)
    scores, targets = _check_inputs(fn, scores, targets)
    ap = _average_precision(scores, targets, method)
    at_threshold = _counting_metrics(_predicted_at_threshold(scores, threshold), targets)
    topk = None if top_k is None else _counting_metrics(_predicted_top_k(scores, top_k), targets)
    recall_by_size = mAP_small = None
    if objects is not None:
        image, cls, area = _check_objects(fn, objects, scores.shape, scores.device)
        if image.numel():
            predicted = _predicted_at_threshold(scores, threshold)
            recall_by_size = _recall_by_size(
                predicted, targets, image, cls, area, [0.0, 0.01, 0.1, 1.0]
            )
            small = _small_object_targets(targets, image, cls, area, 0.01)
            mAP_small = _nan_mean(_average_precision(scores, small, method))
    return MultiLabelMetrics(
        mAP=_nan_mean(ap),
        ap=ap,
        **at_threshold,
        topk=topk,
        k=top_k,
        classes_without_positives=int(torch.isnan(ap).sum()),
        recall_by_size=recall_by_size,
        method=method,
        threshold=threshold,
        mAP_small=mAP_small,
    )


# ---- one class's precision-recall curve ---------------------------------------------------------


def precision_recall_curve(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One class's precision-recall curve, as ``sklearn.metrics.precision_recall_curve`` returns
    it (``drop_intermediate=False``).

    Args:
        scores: ``Tensor[N]``; targets: ``Tensor[N]`` in {-1, 0, 1}, -1 entries dropped.

    Returns:
        ``precision`` and ``recall`` (``Tensor[T + 1]`` float64) and ``thresholds``
        (``Tensor[T]`` float64, the T distinct scores, increasing): element i is the precision and
        recall of ``scores >= thresholds[i]`` (precision 0 without predictions), and the last
        elements are precision 1, recall 0. Without positives, recall is 1 at every threshold
        (scikit-learn's choice, without its warning). Without samples: ``([1.], [0.], [])``.
    """
    fn = "precision_recall_curve"
    scores, targets = _check_inputs(fn, scores, targets, dim=1)
    kept = targets != -1
    scores, targets = scores[kept].to(torch.float64), targets[kept]
    sorted_scores, order = torch.sort(scores, descending=True, stable=True)
    positive = (targets[order] == 1).to(torch.float64)
    true_positives = torch.cumsum(positive, dim=0)
    false_positives = torch.cumsum(1 - positive, dim=0)
    is_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    is_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    true_positives, false_positives = true_positives[is_end], false_positives[is_end]
    precision = _safe_divide(true_positives, true_positives + false_positives)
    if true_positives.numel() and float(true_positives[-1]) > 0:
        recall = true_positives / true_positives[-1]
    else:
        recall = torch.ones_like(true_positives)
    one, zero = scores.new_ones(1), scores.new_zeros(1)
    return (
        torch.cat([torch.flip(precision, [0]), one]),
        torch.cat([torch.flip(recall, [0]), zero]),
        torch.flip(sorted_scores[is_end], [0]),
    )
