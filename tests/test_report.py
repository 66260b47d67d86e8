"""models.report.write_report: the files it writes, what they hold, the optional plots, edge cases
(no positives, N = 0, 80 long class names) and atomic writes. Metrics come from the real
mlkernels.metrics.evaluate; the plotted precision-recall points are checked against
scikit-learn."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlkernels.metrics import evaluate
from mlkernels.ops._checks import ShapeError
from models import report
from models.report import REPORT_FILES, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class TinyDataset:
    """``len`` samples in the models.data format: small random images (uint8, or float normalized
    as a transform would leave them), with the given labels."""

    def __init__(self, labels: torch.Tensor, *, float_images: bool = False):
        self.labels = labels
        self.float_images = float_images

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        height = 24 + 8 * (index % 3)  # images of different shapes
        image = torch.randint(0, 256, (3, height, 32), generator=generator, dtype=torch.uint8)
        if self.float_images:
            image = (image.float() / 255 - 0.45) / 0.225
        return {"image": image, "labels": self.labels[index], "index": index}


def scored_split(num_samples: int, num_classes: int, *, seed: int = 0):
    """Targets with some ignored entries and one class without positives, scores that rank the
    positives higher by a class-dependent margin (so APs spread), and objects of every size."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(num_samples, num_classes, generator=generator) < 0.3).float()
    targets[torch.rand(num_samples, num_classes, generator=generator) < 0.05] = -1
    targets[:, -1] = 0
    margin = torch.linspace(2.5, 0.0, num_classes)
    noise = torch.randn(num_samples, num_classes, generator=generator)
    scores = torch.sigmoid(margin * (2 * targets.clamp(min=0) - 1) + noise)
    present = torch.nonzero(targets == 1)
    objects = {
        "image": present[:, 0],
        "class": present[:, 1],
        "area_fraction": torch.rand(present.shape[0], generator=generator) ** 3,
    }
    return scores, targets, objects


def files_in(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def plotted_curves(scores, targets, names, ap) -> dict[str, tuple]:
    """{class name: (recall, precision)} of the lines drawn in pr_curves.png."""
    positives = (targets == 1).sum(dim=0)
    figure = report._pr_curves_figure(scores.double(), targets, names, ap, positives)
    (axes,) = figure.axes
    curves = {}
    for line in axes.get_lines():
        name = line.get_label().split("\n")[0]
        curves[name] = (line.get_xdata(), line.get_ydata())
    return curves


@pytest.fixture(scope="module")
def split():
    scores, targets, objects = scored_split(120, 6)
    names = [f"class {i}" for i in range(6)]
    metrics = evaluate(scores, targets, objects=objects)
    return scores, targets, objects, names, metrics


def test_every_file_written(tmp_path, split):
    scores, targets, objects, names, metrics = split
    pyplot_loaded_before = "matplotlib.pyplot" in sys.modules
    out = tmp_path / "new" / "report"  # created, parents too
    written = write_report(
        out,
        scores=scores,
        targets=targets,
        class_names=names,
        metrics=metrics,
        objects=objects,
        dataset=TinyDataset(targets),
    )
    assert list(written) == list(REPORT_FILES)
    assert written == {name: out / name for name in REPORT_FILES}
    assert files_in(out) == set(REPORT_FILES)  # and no temporary file left
    for name, path in written.items():
        content = path.read_bytes()
        if name.endswith(".png"):
            assert content.startswith(PNG_SIGNATURE), name
        else:
            assert content.decode().strip(), name
    if not pyplot_loaded_before:
        assert "matplotlib.pyplot" not in sys.modules  # figures never go through pyplot


def test_metrics_json_agrees_with_metrics(tmp_path, split):
    scores, targets, objects, names, metrics = split
    paths = write_report(
        tmp_path, scores=scores, targets=targets, class_names=names, metrics=metrics
    )

    def refuse(constant):
        raise AssertionError(f"metrics.json holds {constant}, which is not JSON")

    data = json.loads(paths["metrics.json"].read_text(), parse_constant=refuse)
    expected = metrics.as_dict()
    assert set(data) == set(expected) | {"per_class_ap"}
    for key, value in expected.items():
        assert_json_matches(data[key], value, key)
    # The class without positives: NaN in metrics, null in the file.
    assert math.isnan(metrics.ap[-1]) and data["ap"][-1] is None
    assert data["classes_without_positives"] == 1
    assert list(data["per_class_ap"]) == names
    assert_json_matches(list(data["per_class_ap"].values()), metrics.ap.tolist(), "per_class_ap")


def assert_json_matches(written, expected, where: str) -> None:
    """``written`` (read back from JSON) is ``expected`` with NaN as None, floats to 1e-15."""
    if isinstance(expected, dict):
        assert isinstance(written, dict) and list(written) == list(expected), where
        for key in expected:
            assert_json_matches(written[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(written, list) and len(written) == len(expected), where
        for i, (item, expected_item) in enumerate(zip(written, expected, strict=True)):
            assert_json_matches(item, expected_item, f"{where}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert written is None, where
    elif isinstance(expected, float):
        assert written == pytest.approx(expected, rel=1e-15, abs=1e-15), where
    else:
        assert written == expected and type(written) is type(expected), where


def test_metrics_markdown(tmp_path, split):
    scores, targets, objects, names, metrics = split
    paths = write_report(
        tmp_path, scores=scores, targets=targets, class_names=names, metrics=metrics
    )
    text = paths["metrics.md"].read_text()
    assert text.startswith(metrics.markdown_table())
    rows = text.split("## Per-class AP, best to worst")[1].strip().splitlines()[2:]
    assert len(rows) == len(names)
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    by_ap = sorted(range(5), key=lambda c: -metrics.ap[c].item())
    assert [row[1] for row in cells] == [names[c] for c in by_ap] + [names[5]]
    assert [row[0] for row in cells] == ["1", "2", "3", "4", "5", ""]
    for row, c in zip(cells[:5], by_ap, strict=True):
        assert float(row[2]) == pytest.approx(100 * metrics.ap[c].item(), abs=0.005)
        assert int(row[3]) == int((targets[:, c] == 1).sum())
    assert cells[5][2:] == ["n/a", "0"]


def test_pr_curve_points_match_sklearn(split):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    scores, targets, objects, names, metrics = split
    curves = plotted_curves(scores, targets, names, metrics.ap)
    assert curves, "no curve drawn"
    for name, (recall, precision) in curves.items():
        c = names.index(name)
        kept = targets[:, c] != -1
        expected_precision, expected_recall, _ = sklearn_metrics.precision_recall_curve(
            targets[kept, c].numpy(), scores[kept, c].numpy()
        )
        assert recall.tolist() == pytest.approx(expected_recall.tolist(), abs=1e-12), name
        assert precision.tolist() == pytest.approx(expected_precision.tolist(), abs=1e-12), name


def test_pr_curves_show_best_median_and_worst_classes():
    scores, targets, _ = scored_split(150, 20, seed=1)
    names = [f"c{i}" for i in range(20)]
    ap = evaluate(scores, targets).ap
    curves = plotted_curves(scores, targets, names, ap)
    ranked = sorted((c for c in range(20) if not math.isnan(ap[c])), key=lambda c: -ap[c].item())
    assert len(curves) == report.MAX_PR_CLASSES
    assert {names[ranked[0]], names[ranked[len(ranked) // 2]], names[ranked[-1]]} <= set(curves)
    assert names[19] not in curves  # no positives, no curve


@pytest.mark.parametrize("objects", [None, "empty"])
def test_optional_plots_absent_without_their_inputs(tmp_path, split, objects):
    scores, targets, all_objects, names, metrics = split
    # A first report with every plot, then one without objects and dataset in the same folder:
    # the stale optional plots must go.
    full = dict(scores=scores, targets=targets, class_names=names, metrics=metrics)
    write_report(tmp_path, **full, objects=all_objects, dataset=TinyDataset(targets))
    if objects == "empty":
        objects = {key: value[:0] for key, value in all_objects.items()}
    written = write_report(tmp_path, **full, objects=objects, dataset=None)
    expected = {"metrics.json", "metrics.md", "pr_curves.png", "per_class_ap.png"}
    assert set(written) == expected
    assert files_in(tmp_path) == expected


def test_recall_by_size_from_objects_when_metrics_have_none(tmp_path, split, monkeypatch):
    scores, targets, objects, names, _ = split
    metrics = evaluate(scores, targets)  # without objects: recall_by_size is None
    drawn = []
    figure = report._recall_by_size_figure
    monkeypatch.setattr(report, "_recall_by_size_figure", lambda r: drawn.append(r) or figure(r))
    written = write_report(
        tmp_path,
        scores=scores,
        targets=targets,
        class_names=names,
        metrics=metrics,
        objects=objects,
    )
    assert "recall_by_size.png" in written
    assert drawn == [evaluate(scores, targets, objects=objects).recall_by_size]


def test_no_samples(tmp_path):
    scores, targets = torch.zeros(0, 4), torch.zeros(0, 4)
    metrics = evaluate(scores, targets)
    objects = {"image": torch.zeros(0, dtype=torch.int64)}
    objects |= {"class": objects["image"], "area_fraction": torch.zeros(0)}
    written = write_report(
        tmp_path,
        scores=scores,
        targets=targets,
        class_names=list("abcd"),
        metrics=metrics,
        objects=objects,
        dataset=TinyDataset(targets),
    )
    assert set(written) == set(REPORT_FILES) - {"recall_by_size.png"}
    data = json.loads(written["metrics.json"].read_text())
    assert data["mAP"] is None and data["per_class_ap"] == dict.fromkeys("abcd")
    assert written["predictions.png"].read_bytes().startswith(PNG_SIGNATURE)


def test_eighty_classes_long_names_float_images(tmp_path):
    scores, targets, objects = scored_split(40, 80, seed=2)
    names = [f"class {i}: " + "a rather long and descriptive name" * (i % 3) for i in range(80)]
    metrics = evaluate(scores, targets, objects=objects)
    written = write_report(
        tmp_path,
        scores=scores,
        targets=targets,
        class_names=names,
        metrics=metrics,
        objects=objects,
        dataset=TinyDataset(targets, float_images=True),
    )
    assert list(written) == list(REPORT_FILES)
    data = json.loads(written["metrics.json"].read_text())
    assert list(data["per_class_ap"]) == names
    figure = report._per_class_ap_figure(names, metrics.ap, metrics.mAP)
    labels = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
    assert len(labels) == 80 and max(map(len, labels)) == report.MAX_NAME_CHARS


def test_many_classes_show_the_best_and_last_bars():
    ap = torch.linspace(1, 0, 130, dtype=torch.float64)
    ap[-3:] = math.nan
    names = [f"c{i}" for i in range(130)]
    figure = report._per_class_ap_figure(names, ap, float(ap.nanmean()))
    labels = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
    half = report.MAX_BARS // 2
    assert labels == names[:half] + names[-half:]


@given(
    scores=st.lists(st.floats(0, 1), min_size=1, max_size=report.MAX_LABEL_LINES),
    data=st.data(),
)
def test_prediction_label_colors(scores, data):
    count = len(scores)
    targets = data.draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=count, max_size=count))
    threshold = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    names = [f"n{i}" for i in range(count)]
    scores_t, targets_t = torch.tensor(scores, dtype=torch.float64), torch.tensor(targets)
    lines = report._label_lines(scores_t, targets_t, names, threshold)
    expected = {}
    for name, score, target in zip(names, scores, targets, strict=True):
        if score >= threshold and target == 1:
            expected[name] = report.CORRECT_COLOR
        elif score >= threshold and target == 0:
            expected[name] = report.FALSE_POSITIVE_COLOR
        elif target == 1:
            expected[name] = report.MISSED_COLOR
    if not expected:
        assert lines == [("(no labels, no predictions)", report.MISSED_COLOR)]
        return
    assert {text.split()[1]: color for text, color in lines} == expected
    order = [report.CORRECT_COLOR, report.FALSE_POSITIVE_COLOR, report.MISSED_COLOR]
    assert [color for _, color in lines] == sorted(expected.values(), key=order.index)


def test_prediction_labels_cut_after_the_last_line():
    count = report.MAX_LABEL_LINES + 3
    lines = report._label_lines(
        torch.linspace(1, 0.6, count, dtype=torch.float64),
        torch.ones(count),
        [f"n{i}" for i in range(count)],
        0.5,
    )
    assert len(lines) == report.MAX_LABEL_LINES
    assert lines[-1] == (f"… {count - report.MAX_LABEL_LINES + 1} more", "black")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, split, monkeypatch):
    scores, targets, objects, names, metrics = split
    (tmp_path / "pr_curves.png").write_bytes(b"old")

    def half_written(figure):
        def save(file):
            file.write(PNG_SIGNATURE)
            raise OSError("disk full")

        return save

    monkeypatch.setattr(report, "_png", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, scores=scores, targets=targets, class_names=names, metrics=metrics)
    assert (tmp_path / "pr_curves.png").read_bytes() == b"old"
    assert files_in(tmp_path) == {"metrics.json", "metrics.md", "pr_curves.png"}


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            dict(scores=torch.rand(5)),
            ShapeError,
            r"scores must be a Tensor\[N, C\], got Tensor\[5\]",
        ),
        (dict(targets=torch.zeros(4, 2)), ShapeError, r"targets must have the shape of scores"),
        (dict(scores=[[0.5]]), TypeError, "scores must be a Tensor"),
        (dict(class_names=["a", "b"]), ValueError, "class_names must be C = 3 names"),
        (dict(class_names="abc"), ValueError, "class_names must be C = 3 names"),
        (dict(class_names=["a", "b", "a"]), ValueError, r"distinct, got \['a'\] more than once"),
        (dict(scores=torch.full((4, 3), math.nan)), ValueError, "must not contain NaN, got 12"),
        (dict(objects={"image": torch.zeros(1)}), ValueError, "objects must be None or a dict"),
        (dict(dataset=TinyDataset(torch.zeros(2, 3))), ValueError, r"len\(dataset\) = 2"),
    ],
)
def test_bad_input(tmp_path, change, error, message):
    arguments = dict(scores=torch.rand(4, 3), targets=torch.ones(4, 3), class_names=list("abc"))
    arguments["metrics"] = evaluate(arguments["scores"], arguments["targets"])
    arguments |= change
    with pytest.raises(error, match="write_report: .*" + message):
        write_report(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_metrics_of_other_classes_refused(tmp_path):
    scores, targets = torch.rand(4, 3), torch.ones(4, 3)
    metrics = evaluate(torch.rand(4, 2), torch.ones(4, 2))
    with pytest.raises(ShapeError, match=r"write_report: metrics.ap must be a Tensor\[C\]"):
        write_report(
            tmp_path, scores=scores, targets=targets, class_names=list("abc"), metrics=metrics
        )
