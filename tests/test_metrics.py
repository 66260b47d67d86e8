"""mlkernels.metrics against scikit-learn, torchmetrics and loop references written here.

Random data has ties (scores from a few values, including -0.0 and 0.0, and values that are not
float32s, which take the float64 sort) and random ignored (-1) entries.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
)
from torchmetrics.classification import MultilabelAveragePrecision

from mlkernels import ShapeError, metrics

# Scores with many ties: float32 values (the packed-key sort) or float64 ones that are not
# float32s (the float64 row sort). Both include a negative value, -0.0 and 0.0.
FLOAT32_LEVELS = [-1.5, -0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
FLOAT64_LEVELS = [-0.1, -0.0, 0.0, 0.1, 1 / 3, 0.5, 2 / 3, 1.0]


@st.composite
def multilabel(draw, max_samples=30, max_classes=5, levels=None, distinct=False, min_samples=0):
    """(scores Tensor[N, C] float64, targets Tensor[N, C] int64 in {-1, 0, 1})."""
    n = draw(st.integers(min_samples, max_samples))
    c = draw(st.integers(1, max_classes))
    if distinct:
        # No two samples tie (within a class): a permutation of n * c distinct values.
        order = draw(st.permutations(range(n * c)))
        scores = torch.tensor(order, dtype=torch.float64).reshape(n, c) / max(n * c, 1)
    else:
        levels = levels or draw(st.sampled_from([FLOAT32_LEVELS, FLOAT64_LEVELS]))
        values = draw(st.lists(st.sampled_from(levels), min_size=n * c, max_size=n * c))
        scores = torch.tensor(values, dtype=torch.float64).reshape(n, c)
    targets = draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=n * c, max_size=n * c))
    return scores, torch.tensor(targets, dtype=torch.int64).reshape(n, c)


def kept_column(scores, targets, j):
    """Class j's scores and 0/1 targets as numpy arrays, ignored samples dropped."""
    kept = targets[:, j] != -1
    return scores[kept, j].numpy(), (targets[kept, j] == 1).numpy().astype(int)


def assert_same_floats(actual, expected, tol=1e-12):
    """Equal within ``tol``, NaN where the other is NaN."""
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol)


# ---- loop references: the textbook definitions --------------------------------------------------


def rank_ap_reference(scores: list[float], targets: list[int]) -> float:
    """ML-GCN/ASL: walk the samples by decreasing score (ties: lower index first), skipping
    ignored ones; at each positive add the precision of the samples seen so far."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
    seen = positives = 0
    total = 0.0
    for i in order:
        if targets[i] == -1:
            continue
        seen += 1
        if targets[i] == 1:
            positives += 1
            total += positives / seen
    return total / positives if positives else math.nan


def pr_points(scores: list[float], targets: list[int]) -> list[tuple[float, float]]:
    """(recall, precision) of ``score >= t`` for each distinct score t, decreasing t."""
    kept = [(s, t) for s, t in zip(scores, targets, strict=True) if t != -1]
    num_positives = sum(t == 1 for _, t in kept)
    points = []
    for threshold in sorted({s for s, _ in kept}, reverse=True):
        predicted = [t for s, t in kept if s >= threshold]
        hits = sum(t == 1 for t in predicted)
        points.append((hits / num_positives, hits / len(predicted)))
    return points


def voc_ap_reference(scores: list[float], targets: list[int]) -> float:
    """All-point interpolated AP: the area under P_interp(R) = max over R' >= R of P(R')."""
    if not any(t == 1 for t in targets):
        return math.nan
    points = pr_points(scores, targets)
    area, previous_recall = 0.0, 0.0
    for recall, _ in points:
        if recall > previous_recall:
            interpolated = max(p for r, p in points if r >= recall)
            area += (recall - previous_recall) * interpolated
            previous_recall = recall
    return area


def per_class(reference, scores, targets):
    return [
        reference(scores[:, j].tolist(), targets[:, j].tolist()) for j in range(scores.shape[1])
    ]


def sklearn_step_ap(scores, targets):
    result = []
    for j in range(scores.shape[1]):
        column_scores, column_targets = kept_column(scores, targets, j)
        if column_targets.sum() == 0:
            result.append(math.nan)
        else:
            result.append(average_precision_score(column_targets, column_scores))
    return result


def sklearn_step_ap_one(scores: list[float], targets: list[int]) -> float:
    kept = [(s, t) for s, t in zip(scores, targets, strict=True) if t != -1]
    if not any(t == 1 for _, t in kept):
        return math.nan
    return average_precision_score([t for _, t in kept], [s for s, _ in kept])


# ---- average precision --------------------------------------------------------------------------


@given(multilabel())
def test_step_ap_equals_sklearn(data):
    scores, targets = data
    assert_same_floats(metrics.average_precision(scores, targets), sklearn_step_ap(scores, targets))


@given(multilabel(levels=[0.0, 0.25, 0.5, 0.75, 1.0], min_samples=1))
def test_step_ap_equals_torchmetrics(data):
    # Scores in [0, 1] (torchmetrics applies a sigmoid to others); it computes in float32, wants
    # 2 classes or more (two padding classes without positives are added) and fails on a class whose
    # entries are all ignored (left out here: its AP is NaN, as for any class without positives).
    scores, targets = data
    ours = metrics.average_precision(scores, targets)
    has_positives = (targets == 1).any(dim=0)
    assert torch.isnan(ours[~has_positives]).all()
    counted = (targets != -1).any(dim=0)
    padding = torch.zeros(len(scores), 2, dtype=torch.int64)
    scores = torch.cat([scores[:, counted], padding.double()], dim=1)
    targets = torch.cat([targets[:, counted], padding], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about classes without positives
        theirs = MultilabelAveragePrecision(
            num_labels=scores.shape[1], average=None, thresholds=None, ignore_index=-1
        )(scores, targets)[:-2]
    kept = has_positives[counted]
    torch.testing.assert_close(ours[counted][kept].float(), theirs[kept])


@given(multilabel())
def test_rank_ap_equals_loop_reference(data):
    scores, targets = data
    assert_same_floats(
        metrics.average_precision(scores, targets, method="rank"),
        per_class(rank_ap_reference, scores, targets),
    )


@given(multilabel())
def test_voc_ap_equals_loop_reference(data):
    scores, targets = data
    voc = metrics.average_precision(scores, targets, method="voc")
    assert_same_floats(voc, per_class(voc_ap_reference, scores, targets))
    # The interpolated precision is never below the precision itself.
    step = metrics.average_precision(scores, targets, method="step")
    assert bool((voc[~voc.isnan()] >= step[~step.isnan()] - 1e-12).all())


@given(multilabel(distinct=True))
def test_rank_equals_step_without_ties(data):
    scores, targets = data
    assert_same_floats(
        metrics.average_precision(scores, targets, method="rank"),
        metrics.average_precision(scores, targets, method="step"),
    )


@pytest.mark.parametrize("method", ["step", "rank", "voc"])
@given(data=multilabel(levels=[-math.inf, -2.0, -0.0, 0.0, 0.5, math.inf]))
def test_ap_depends_only_on_the_order_of_scores(method, data):
    # Infinite scores, -0.0 == 0.0: the same AP as the scores' dense ranks.
    scores, targets = data
    ranks = torch.unique(scores, return_inverse=True)[1].to(torch.float64)
    assert_same_floats(
        metrics.average_precision(scores, targets, method=method),
        metrics.average_precision(ranks, targets, method=method),
    )


@pytest.mark.parametrize("method", ["step", "rank", "voc"])
@given(data=multilabel())
def test_mean_average_precision_is_the_mean_over_classes_with_positives(method, data):
    scores, targets = data
    ap = per_class(
        {"step": sklearn_step_ap_one, "rank": rank_ap_reference, "voc": voc_ap_reference}[method],
        scores,
        targets,
    )
    kept = [value for value in ap if not math.isnan(value)]
    expected = sum(kept) / len(kept) if kept else math.nan
    assert_same_floats(metrics.mean_average_precision(scores, targets, method=method), expected)


def test_rank_ap_ties_go_by_sample_index():
    # One positive and one negative tied: the positive first (index 0) gives AP 1, after gives 1/2.
    targets = torch.tensor([[1], [0]])
    assert metrics.average_precision(torch.ones(2, 1), targets, method="rank").item() == 1.0
    assert metrics.average_precision(torch.ones(2, 1), targets.flip(0), method="rank").item() == 0.5
    # "step" and "voc" treat the tie as one threshold: precision 1/2 either way.
    for method in ("step", "voc"):
        assert metrics.average_precision(torch.ones(2, 1), targets, method=method).item() == 0.5


# ---- threshold and top-k metrics ----------------------------------------------------------------


def sklearn_counting(predicted: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """CP, CR, OP, OR, OF1 by scikit-learn (N > 0: it refuses empty inputs). Zeroing ignored
    entries in both the targets and the predictions leaves every count as leaving them out."""
    ignored = targets == -1
    y_true = ((targets == 1) & ~ignored).numpy().astype(int)
    y_pred = (predicted & ~ignored).numpy().astype(int)
    # A column of zeros in both (no count, not among the labels averaged), so that scikit-learn
    # sees a label-indicator matrix even for one class (it reads Tensor[N, 1] as binary labels).
    y_true, y_pred = (np.pad(y, ((0, 0), (0, 1))) for y in (y_true, y_pred))
    with_positives = np.flatnonzero(y_true.sum(axis=0) > 0)
    result = {"CP": math.nan, "CR": math.nan}
    if len(with_positives):
        for key, score in (("CP", precision_score), ("CR", recall_score)):
            result[key] = score(
                y_true, y_pred, labels=with_positives, average="macro", zero_division=0
            )
    result["OP"] = precision_score(y_true, y_pred, average="micro", zero_division=0)
    if y_true.sum():
        result["OR"] = recall_score(y_true, y_pred, average="micro", zero_division=0)
        result["OF1"] = f1_score(y_true, y_pred, average="micro", zero_division=0)
    else:
        result["OR"] = result["OF1"] = math.nan
    return result


def check_counting_metrics(ours: dict[str, float], predicted, targets):
    assert set(ours) == {"CP", "CR", "CF1", "OP", "OR", "OF1"}
    expected = sklearn_counting(predicted, targets)
    for key, value in expected.items():
        assert_same_floats(ours[key], value)
    cp, cr = ours["CP"], ours["CR"]
    if math.isnan(cp):
        assert math.isnan(ours["CF1"])
    else:
        assert_same_floats(ours["CF1"], 2 * cp * cr / (cp + cr) if cp + cr else 0.0)


@given(multilabel(min_samples=1), st.sampled_from([-0.0, 0.1, 0.25, 0.5, 1 / 3, 1.0]))
def test_threshold_metrics_equal_sklearn(data, threshold):
    scores, targets = data
    ours = metrics.threshold_metrics(scores, targets, threshold=threshold)
    check_counting_metrics(ours, scores >= threshold, targets)


def top_k_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    predicted = torch.zeros(scores.shape, dtype=torch.bool)
    for i, row in enumerate(scores.tolist()):
        for j in sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]:
            predicted[i, j] = True
    return predicted


@given(multilabel(max_classes=7, min_samples=1), st.integers(1, 8))
def test_top_k_metrics_equal_sklearn(data, k):
    scores, targets = data
    ours = metrics.top_k_metrics(scores, targets, k=k)
    check_counting_metrics(ours, top_k_reference(scores, k), targets)


def test_threshold_is_compared_in_float64():
    # 0.1000000015 is above float32(0.1) = 0.10000000149..., but rounds to it in float32: the
    # float32 score is below the threshold, as its float64 copy is.
    score = torch.tensor([[0.1]])
    for scores in (score, score.double()):
        assert (
            metrics.threshold_metrics(scores, torch.ones(1, 1), threshold=0.1000000015)["OR"] == 0
        )
        assert metrics.threshold_metrics(scores, torch.ones(1, 1), threshold=0.1)["OR"] == 1


# ---- recall by object size ----------------------------------------------------------------------

AREAS = [0.0, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 1.5, -0.1]
OBJECT_COLUMNS = ("image", "class", "area_fraction")


@st.composite
def with_objects(draw):
    scores, targets = draw(multilabel(min_samples=1))
    n, c = scores.shape
    m = draw(st.integers(0, 20))
    image = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
    cls = draw(st.lists(st.integers(0, c - 1), min_size=m, max_size=m))
    area = draw(st.lists(st.sampled_from(AREAS), min_size=m, max_size=m))
    objects = {
        "image": torch.tensor(image, dtype=torch.int64),
        "class": torch.tensor(cls, dtype=torch.int64),
        "area_fraction": torch.tensor(area, dtype=torch.float32),
    }
    return scores, targets, objects


def recall_by_size_reference(predicted, targets, objects, bins):
    edges = list(zip(bins[:-1], bins[1:], strict=True))
    counts, hits = [0] * len(edges), [0] * len(edges)
    columns = (objects[key].tolist() for key in ("image", "class", "area_fraction"))
    for i, j, area in zip(*columns, strict=True):
        if targets[i, j] == -1:
            continue
        for b, (low, high) in enumerate(edges):
            last = b == len(edges) - 1
            if low <= area < high or (last and area == high):
                counts[b] += 1
                hits[b] += bool(predicted[i, j])
    return [(h / c if c else math.nan, c) for h, c in zip(hits, counts, strict=True)]


@given(with_objects(), st.sampled_from([None, 1, 2]))
def test_recall_by_object_size_equals_loop(data, top_k):
    scores, targets, objects = data
    bins = (0.0, 0.01, 0.1, 1.0)
    result = metrics.recall_by_object_size(scores, targets, objects, threshold=0.5, top_k=top_k)
    assert list(result) == ["small (<1%)", "medium (1-10%)", "large (>=10%)"]
    predicted = scores >= 0.5 if top_k is None else top_k_reference(scores, top_k)
    expected = recall_by_size_reference(predicted, targets, objects, bins)
    for entry, (recall, count) in zip(result.values(), expected, strict=True):
        assert entry["objects"] == count
        assert_same_floats(entry["recall"], recall)


@given(with_objects(), st.sampled_from(["step", "rank", "voc"]))
def test_small_object_ap_is_ap_over_images_of_only_small_objects(data, method):
    scores, targets, objects = data
    # The loop reading of the definition: a positive stays positive only when it has objects and
    # every one of them is under 1% of the image; other positives are left out (-1).
    kept = targets.clone()
    n, c = targets.shape
    for i in range(n):
        for j in range(c):
            areas = [
                a
                for im, cl, a in zip(*(objects[k].tolist() for k in OBJECT_COLUMNS), strict=True)
                if im == i and cl == j
            ]
            if targets[i, j] == 1 and (not areas or max(areas) >= 0.01):
                kept[i, j] = -1
    expected = metrics.average_precision(scores, kept, method=method)
    ours = metrics.small_object_average_precision(scores, targets, objects, method=method)
    assert_same_floats(ours.tolist(), expected.tolist())
    whole = metrics.evaluate(scores, targets, method=method, objects=objects)
    if objects["image"].numel():
        assert_same_floats(
            whole.mAP_small, metrics.mean_average_precision(scores, kept, method=method)
        )
    else:
        assert whole.mAP_small is None


def test_recall_by_object_size_custom_bins():
    scores = torch.tensor([[0.9, 0.1]])
    targets = torch.tensor([[1, 1]])
    objects = {
        "image": torch.tensor([0, 0, 0]),
        "class": torch.tensor([0, 1, 1]),
        "area_fraction": torch.tensor([0.3, 0.3, 0.02]),
    }
    result = metrics.recall_by_object_size(scores, targets, objects, bins=[0.0, 0.05, 0.5])
    assert result == {
        "small (<5%)": {"recall": 0.0, "objects": 1},
        "large (5-50%)": {"recall": 0.5, "objects": 2},
    }


# ---- edge cases ---------------------------------------------------------------------------------


def test_no_samples():
    scores, targets = torch.zeros(0, 3), torch.zeros(0, 3)
    for method in ("step", "rank", "voc"):
        ap = metrics.average_precision(scores, targets, method=method)
        assert ap.shape == (3,) and ap.dtype == torch.float64 and bool(ap.isnan().all())
        assert math.isnan(metrics.mean_average_precision(scores, targets, method=method))
    for result in (
        metrics.threshold_metrics(scores, targets),
        metrics.top_k_metrics(scores, targets),
    ):
        assert result["OP"] == 0.0
        assert all(math.isnan(result[key]) for key in ("CP", "CR", "CF1", "OR", "OF1"))
    empty = torch.zeros(0, dtype=torch.int64)
    objects = {"image": empty, "class": empty, "area_fraction": torch.zeros(0)}
    by_size = metrics.recall_by_object_size(scores, targets, objects)
    assert all(entry["objects"] == 0 and math.isnan(entry["recall"]) for entry in by_size.values())
    result = metrics.evaluate(scores, targets, objects=objects)
    assert result.classes_without_positives == 3 and result.recall_by_size is None
    json.dumps(result.as_dict())
    precision, recall, thresholds = metrics.precision_recall_curve(torch.zeros(0), torch.zeros(0))
    assert precision.tolist() == [1.0] and recall.tolist() == [0.0] and thresholds.numel() == 0


def test_class_without_positives_is_excluded_and_counted():
    # Class 1 has no positive (one ignored entry) but two predictions, both false positives.
    scores = torch.tensor([[0.9, 0.8, 0.2], [0.3, 0.7, 0.6], [0.6, 0.1, 0.4], [0.2, 0.9, 0.8]])
    targets = torch.tensor([[1, 0, 0], [0, -1, 1], [1, 0, 1], [0, 0, 0]])
    result = metrics.evaluate(scores, targets, threshold=0.5, top_k=1)
    assert math.isnan(result.ap[1]) and result.classes_without_positives == 1
    assert_same_floats(result.mAP, (result.ap[0] + result.ap[2]).item() / 2)
    # Class 0: 2 of 2 predictions right, recall 1; class 2: 2 predicted (rows 1, 3), 1 right of 2.
    assert_same_floats(result.CP, (1.0 + 0.5) / 2)
    assert_same_floats(result.CR, (1.0 + 0.5) / 2)
    # OP counts class 1's predictions (rows 0 and 3; row 1 is ignored) as false positives.
    assert_same_floats(result.OP, 3 / (2 + 2 + 2))
    assert_same_floats(result.OR, 3 / 4)


@given(multilabel())
def test_precision_recall_curve_equals_sklearn(data):
    scores, targets = data
    column_scores, column_targets = kept_column(scores, targets, 0)
    ours = metrics.precision_recall_curve(scores[:, 0], targets[:, 0])
    if len(column_targets) == 0:
        assert [t.tolist() for t in ours] == [[1.0], [0.0], []]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns when there is no positive
        theirs = precision_recall_curve(column_targets, column_scores)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.dtype == torch.float64
        np.testing.assert_array_equal(mine.numpy(), reference)


def assert_same_metrics(actual: metrics.MultiLabelMetrics, expected: metrics.MultiLabelMetrics):
    actual, expected = actual.as_dict(), expected.as_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float | list):
            assert_same_floats(actual[key], value)
        elif isinstance(value, dict):
            assert actual[key].keys() == value.keys()
            for entry, expected_entry in zip(actual[key].values(), value.values(), strict=True):
                if isinstance(expected_entry, dict):  # recall_by_size
                    assert entry["objects"] == expected_entry["objects"]
                    assert_same_floats(entry["recall"], expected_entry["recall"])
                else:
                    assert_same_floats(entry, expected_entry)
        else:
            assert actual[key] == value


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64]
)
@given(data=multilabel(levels=[-2.0, -0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 3.0]))
def test_dtype_invariance(dtype, data):
    # Every level is exact in every dtype (int64: after scaling by 4), so the results agree.
    scores, targets = data
    scale = 4.0 if dtype == torch.int64 else 1.0
    converted = (scores * scale).to(dtype)
    for target_dtype in (torch.float32, torch.int8):
        a = metrics.evaluate(scores * scale, targets, threshold=0.5 * scale, top_k=2)
        b = metrics.evaluate(converted, targets.to(target_dtype), threshold=0.5 * scale, top_k=2)
        assert_same_metrics(b, a)
    for method in ("rank", "voc"):
        assert_same_floats(
            metrics.average_precision(converted, targets, method=method),
            metrics.average_precision(scores, targets, method=method),
        )


@pytest.mark.cuda
@given(data=multilabel(max_samples=40))
def test_cuda_equals_cpu(data):
    scores, targets = data
    objects = {
        "image": torch.zeros(2, dtype=torch.int64),
        "class": torch.zeros(2, dtype=torch.int64),
        "area_fraction": torch.tensor([0.001, 0.5]),
    }
    if not len(scores):
        objects = {key: value[:0] for key, value in objects.items()}
    on_cpu = metrics.evaluate(scores, targets, objects=objects)
    on_gpu = metrics.evaluate(
        scores.float().cuda(),
        targets.cuda(),
        objects={key: value.cuda() for key, value in objects.items()},
    )
    assert on_gpu.ap.device.type == "cuda"
    assert_same_metrics(on_gpu, on_cpu)
    for method in ("rank", "voc"):
        assert_same_floats(
            metrics.average_precision(scores.cuda(), targets.cuda(), method=method).cpu(),
            metrics.average_precision(scores, targets, method=method),
        )


# ---- the result object --------------------------------------------------------------------------


def test_evaluate_result_as_dict_and_markdown():
    scores = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.8, 0.6], [0.7, 0.3, 0.05]])
    targets = torch.tensor([[1, 0, -1], [0, 1, 0], [1, 0, 0]])
    objects = {
        "image": torch.tensor([0, 1, 2]),
        "class": torch.tensor([0, 1, 0]),
        "area_fraction": torch.tensor([0.005, 0.2, 0.05]),
    }
    result = metrics.evaluate(scores, targets, method="voc", top_k=2, objects=objects)
    assert_same_floats(result.ap, metrics.average_precision(scores, targets, method="voc"))
    assert result.topk == metrics.top_k_metrics(scores, targets, k=2)
    assert result.recall_by_size == metrics.recall_by_object_size(scores, targets, objects)
    as_dict = json.loads(json.dumps(result.as_dict()))
    assert_same_floats(as_dict["ap"], result.ap.tolist())
    assert as_dict["k"] == 2
    assert as_dict["classes_without_positives"] == 1 and as_dict["method"] == "voc"
    table = result.markdown_table(class_names=["cat", "dog", "bird"])
    for text in ("| mAP | CP | CR | CF1 | OP | OR | OF1 |", "| top-2 |", "small (<1%)", "| bird |"):
        assert text in table
    assert f"| score >= 0.5 | {100 * result.mAP:.2f} | {100 * result.CP:.2f} |" in table
    assert "| bird | n/a |" in table  # no positive
    no_extras = metrics.evaluate(scores, targets, top_k=None).markdown_table()
    assert "top-" not in no_extras and "object size" not in no_extras


# ---- bad input ----------------------------------------------------------------------------------

S, T = torch.rand(4, 3), torch.ones(4, 3)
OBJECTS = {"image": torch.tensor([0]), "class": torch.tensor([2]), "area_fraction": torch.ones(1)}


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: metrics.average_precision(S, torch.full((4, 3), 2)),
            ValueError,
            "average_precision: targets must have values in {-1, 0, 1}, got 2",
        ),
        (
            lambda: metrics.mean_average_precision(S, T * 0.5),
            ValueError,
            "mean_average_precision: targets must have values in {-1, 0, 1}, got 0.5",
        ),
        (
            lambda: metrics.threshold_metrics(S, T[:3]),
            ShapeError,
            "threshold_metrics: targets must have the shape of scores, Tensor[4, 3], "
            "got Tensor[3, 3]",
        ),
        (
            lambda: metrics.top_k_metrics(S[0], T[0]),
            ShapeError,
            "top_k_metrics: scores must be a Tensor[N, C], got Tensor[3]",
        ),
        (
            lambda: metrics.average_precision([[0.5]], T),
            TypeError,
            "average_precision: scores must be a Tensor[N, C], got list",
        ),
        (
            lambda: metrics.average_precision(S.bool(), T),
            TypeError,
            "average_precision: scores must have a real dtype, got torch.bool",
        ),
        (
            lambda: metrics.evaluate(torch.full((4, 3), math.nan), T),
            ValueError,
            "evaluate: scores must not contain NaN, got 12 NaN value(s)",
        ),
        (
            lambda: metrics.average_precision(S, T, method="11point"),
            ValueError,
            "average_precision: method must be one of 'step', 'rank', 'voc', got '11point'",
        ),
        (
            lambda: metrics.top_k_metrics(S, T, k=0),
            ValueError,
            "top_k_metrics: k must be >= 1, got 0",
        ),
        (
            lambda: metrics.evaluate(S, T, top_k=2.0),
            TypeError,
            "evaluate: top_k must be an int, got float",
        ),
        (
            lambda: metrics.threshold_metrics(S, T, threshold=math.nan),
            ValueError,
            "threshold_metrics: threshold must not be NaN, got nan",
        ),
        (
            lambda: metrics.recall_by_object_size(S, T, OBJECTS, threshold=None),
            ValueError,
            "recall_by_object_size: threshold or top_k must be given, got None for both",
        ),
        (
            lambda: metrics.recall_by_object_size(S, T, {"image": torch.tensor([0])}),
            ValueError,
            "recall_by_object_size: objects must have keys 'image', 'class', 'area_fraction', "
            "missing ['class', 'area_fraction']",
        ),
        (
            lambda: metrics.recall_by_object_size(S, T, {**OBJECTS, "image": torch.tensor([4])}),
            ValueError,
            "recall_by_object_size: objects['image'] must be in [0, 4), got 4",
        ),
        (
            lambda: metrics.recall_by_object_size(S, T, {**OBJECTS, "class": torch.tensor([-1])}),
            ValueError,
            "recall_by_object_size: objects['class'] must be in [0, 3), got -1",
        ),
        (
            lambda: metrics.recall_by_object_size(S, T, {**OBJECTS, "class": torch.tensor([0.0])}),
            TypeError,
            "recall_by_object_size: objects['class'] must be an integer tensor, got torch.float32",
        ),
        (
            lambda: metrics.evaluate(S, T, objects={**OBJECTS, "class": torch.tensor([0, 1])}),
            ShapeError,
            "evaluate: objects' tensors must have one length M",
        ),
        (
            lambda: metrics.recall_by_object_size(S, T, OBJECTS, bins=(0.0, 0.5, 0.5)),
            ValueError,
            "recall_by_object_size: bins must be strictly increasing, got (0.0, 0.5, 0.5)",
        ),
        (
            lambda: metrics.evaluate(S, T).markdown_table(class_names=["a"]),
            ValueError,
            "MultiLabelMetrics.markdown_table: class_names must have 3 names (one per class), "
            "got 1",
        ),
        (
            lambda: metrics.precision_recall_curve(S, T),
            ShapeError,
            "precision_recall_curve: scores must be a Tensor[N], got Tensor[4, 3]",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(message)


@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_best_threshold_is_the_best_candidate(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(12, 4, generator=generator)
    targets = torch.randint(-1, 2, (12, 4), generator=generator)
    candidates = [0.1, 0.25, 0.5, 0.75, 0.9]
    chosen = metrics.best_threshold(scores, targets, metric="OF1", candidates=candidates)
    values = [metrics.threshold_metrics(scores, targets, threshold=t)["OF1"] for t in candidates]
    finite = [v for v in values if not math.isnan(v)]
    if finite:
        assert values[candidates.index(chosen)] == max(finite)
        assert chosen == candidates[values.index(max(finite))]  # the lowest of tied ones
    else:
        assert chosen == candidates[0]


def test_best_threshold_default_grid_and_bad_arguments():
    scores = torch.tensor([[0.9, 0.2], [0.3, 0.35], [0.8, 0.05]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0]])
    # Every class is perfect (CF1 1) for thresholds in (0.3, 0.35]: class 0's negative scores
    # 0.3, class 1's only positive 0.35. The grid's lowest such value is 0.31.
    assert metrics.best_threshold(scores, targets) == pytest.approx(0.31)
    with pytest.raises(ValueError, match="best_threshold: metric"):
        metrics.best_threshold(scores, targets, metric="mAP")
    with pytest.raises(ValueError, match="candidates must not be empty"):
        metrics.best_threshold(scores, targets, candidates=[])
