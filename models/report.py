"""The end-of-run report: metrics as JSON and Markdown, plus plots, written into one folder.

The trainer calls :func:`write_report` once a run has scored its test split. Everything it writes
is for a reader of the run (and for a later run to compare against): the numbers of
:class:`mlkernels.metrics.MultiLabelMetrics` with the per-class AP under each class's name,
precision-recall curves of a few classes, the per-class AP sorted, recall by object size and a
grid of test images with their predicted and true labels.

Plots are drawn with matplotlib's Agg canvas on figures that pyplot never sees, so no window
opens and no global figure state is left behind; matplotlib is imported only when a report is
written. Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a reader (or a crash) never sees half a file. A report of 2000 images and 20
classes, every plot included, takes about 1.1 s of CPU time in a fresh process (half of it
importing matplotlib) and 0.6 s after that (x86-64, 1 torch thread).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import Tensor

from mlkernels.metrics import MultiLabelMetrics, precision_recall_curve, recall_by_object_size
from mlkernels.ops._checks import ShapeError, shape_str
from models.atomic import written_atomically

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# The files write_report may write, in the order it writes them. The last two are optional.
REPORT_FILES = (
    "metrics.json",
    "metrics.md",
    "pr_curves.png",
    "per_class_ap.png",
    "recall_by_size.png",
    "predictions.png",
)
OBJECT_KEYS = ("image", "class", "area_fraction")

MAX_PR_CLASSES = 6  # curves in pr_curves.png
MAX_BARS = 100  # classes in per_class_ap.png; beyond it, the best and the last halves
GRID_IMAGES = 12  # images in predictions.png
GRID_COLUMNS = 4
MAX_LABEL_LINES = 7  # label lines under an image in predictions.png
MAX_NAME_CHARS = 28  # class names longer than this are cut with an ellipsis in plots
MAX_IMAGE_SIDE = 256  # images in predictions.png are subsampled to at most this many pixels
DPI = 100

CORRECT_COLOR = "#1a7f37"  # green
FALSE_POSITIVE_COLOR = "#cf222e"  # red
MISSED_COLOR = "#8c959f"  # grey


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    scores: Tensor,
    targets: Tensor,
    class_names: Sequence[str],
    metrics: MultiLabelMetrics,
    objects: dict[str, Tensor] | None = None,
    dataset: Any = None,
) -> dict[str, Path]:
    """Write the report of a run into ``out_dir`` (created if needed); return the files written.

    Args:
        out_dir: the folder; the files of an earlier report there are replaced.
        scores: ``Tensor[N, C]``, probability-like scores in [0, 1], any device and real dtype,
            no NaN (as :func:`mlkernels.metrics.evaluate` requires).
        targets: ``Tensor[N, C]``, 1 present, 0 absent, -1 ignored (left out everywhere).
        class_names: ``C`` distinct names, in label order.
        metrics: what ``mlkernels.metrics.evaluate(scores, targets, ...)`` returned for these
            scores and targets; its ``ap``, ``mAP``, ``threshold`` and ``recall_by_size`` are
            what the report shows.
        objects: ``None`` or a dataset's ``objects``, ``{"image": Tensor[M] int64, "class":
            Tensor[M] int64, "area_fraction": Tensor[M] float}``, for the recall by object size:
            ``metrics.recall_by_size`` when ``evaluate`` had them, else computed from them at
            ``metrics.threshold`` with :func:`mlkernels.metrics.recall_by_object_size`.
        dataset: ``None`` or the dataset the scores are for (``len(dataset) == N``, the sample
            format of :mod:`models.data`), for the picture grid.

    Returns:
        ``{file name: path}`` of the files written, in :data:`REPORT_FILES` order:

        - ``metrics.json``: ``metrics.as_dict()`` plus ``"per_class_ap"``, ``{class name: AP}``,
          as strict JSON: NaN (an AP without positives, say) is written as ``null``;
        - ``metrics.md``: ``metrics.markdown_table()`` plus the per-class AP from best
          to worst with each class's number of positives;
        - ``pr_curves.png``: the precision-recall curves of up to 6 classes with positives: the
          best, the median, the worst and quartiles between them by AP;
        - ``per_class_ap.png``: the per-class AP as bars, best at the top, with the mAP;
        - ``recall_by_size.png``: recall per object-size bin, with each bin's number of
          objects; absent when ``objects`` is ``None`` or empty;
        - ``predictions.png``: 12 images spread evenly over the dataset, each with its correct
          predictions (green), false positives (red) and missed labels (grey) at
          ``metrics.threshold``; absent when ``dataset`` is ``None``.

        An optional plot that is not written is removed from ``out_dir`` if an earlier report
        left one there, so the folder always holds what the returned dict lists.

    Raises:
        TypeError: ``scores`` or ``targets`` not a tensor.
        ShapeError: ``scores`` not 2-d, ``targets`` or ``metrics.ap`` not of its shape.
        ValueError: NaN scores, ``class_names`` not ``C`` distinct names, ``objects`` without its
            three keys, ``len(dataset) != N``.
    """
    scores, targets = _check_inputs(scores, targets, class_names, metrics, objects, dataset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    ap = metrics.ap.detach().to("cpu", torch.float64)
    positives = (targets == 1).sum(dim=0)

    written: dict[str, Path] = {}

    def write(name: str, content: Callable[[IO[bytes]], None]) -> None:
        _write_atomic(out / name, content)
        written[name] = out / name

    write("metrics.json", _text(_metrics_json(metrics, names, ap)))
    write("metrics.md", _text(_metrics_markdown(metrics, names, ap, positives)))
    write("pr_curves.png", _png(_pr_curves_figure(scores, targets, names, ap, positives)))
    write("per_class_ap.png", _png(_per_class_ap_figure(names, ap, metrics.mAP)))
    if objects is not None and objects["image"].numel() > 0:
        recall_by_size = metrics.recall_by_size
        if recall_by_size is None:
            on_cpu = {key: objects[key].cpu() for key in OBJECT_KEYS}
            recall_by_size = recall_by_object_size(
                scores, targets, on_cpu, threshold=metrics.threshold
            )
        write("recall_by_size.png", _png(_recall_by_size_figure(recall_by_size)))
    if dataset is not None:
        figure = _predictions_figure(scores, targets, names, dataset, metrics.threshold)
        write("predictions.png", _png(figure))
    for name in REPORT_FILES:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return written


# ---- inputs, files ------------------------------------------------------------------------------


def _check_inputs(
    scores: Tensor,
    targets: Tensor,
    class_names: Sequence[str],
    metrics: MultiLabelMetrics,
    objects: dict[str, Tensor] | None,
    dataset: Any,
) -> tuple[Tensor, Tensor]:
    """The checked scores and targets, detached, as float64 and float32 on the CPU."""
    fn = "write_report"
    for name, value in (("scores", scores), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor[N, C], got {type(value).__name__}")
    if scores.dim() != 2:
        raise ShapeError(f"{fn}: scores must be a Tensor[N, C], got {shape_str(scores)}")
    if targets.shape != scores.shape:
        raise ShapeError(
            f"{fn}: targets must have the shape of scores, {shape_str(scores)}, "
            f"got {shape_str(targets)}"
        )
    scores = scores.detach().to("cpu", torch.float64)
    nans = int(scores.isnan().sum())
    if nans:
        raise ValueError(f"{fn}: scores must not contain NaN, got {nans} NaN value(s)")
    num_classes = scores.shape[1]
    if isinstance(class_names, str) or len(class_names) != num_classes:
        got = repr(class_names) if isinstance(class_names, str) else f"{len(class_names)} names"
        raise ValueError(
            f"{fn}: class_names must be C = {num_classes} names (scores are "
            f"{shape_str(scores)}), got {got}"
        )
    if len(set(class_names)) != num_classes:
        repeated = sorted({n for n in class_names if list(class_names).count(n) > 1})
        raise ValueError(f"{fn}: class_names must be distinct, got {repeated} more than once")
    if metrics.ap.shape != (num_classes,):
        raise ShapeError(
            f"{fn}: metrics.ap must be a Tensor[C] with C = {num_classes} (the classes of "
            f"scores), got {shape_str(metrics.ap)}"
        )
    if objects is not None and (
        not isinstance(objects, dict) or any(key not in objects for key in OBJECT_KEYS)
    ):
        got = sorted(objects) if isinstance(objects, dict) else type(objects).__name__
        raise ValueError(f"{fn}: objects must be None or a dict of {OBJECT_KEYS}, got {got}")
    if dataset is not None and len(dataset) != scores.shape[0]:
        raise ValueError(
            f"{fn}: dataset must hold the N = {scores.shape[0]} scored samples, "
            f"got len(dataset) = {len(dataset)}"
        )
    return scores, targets.detach().to("cpu", torch.float32)


def _write_atomic(path: Path, content: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file beside it and ``os.replace``."""
    with written_atomically(path) as temporary, open(temporary, "wb") as file:
        content(file)


def _text(text: str) -> Callable[[IO[bytes]], None]:
    return lambda file: file.write(text.encode())


def _png(figure: Figure) -> Callable[[IO[bytes]], None]:
    def save(file: IO[bytes]) -> None:
        figure.savefig(file, format="png", dpi=DPI)

    return save


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """Plain Python ``value`` (``as_dict()``'s) with NaN and infinite floats as ``None``."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float):
        return _finite_or_none(value)
    return value


def _metrics_json(metrics: MultiLabelMetrics, names: list[str], ap: Tensor) -> str:
    data = _jsonable(metrics.as_dict())
    per_class = zip(names, ap.tolist(), strict=True)
    data["per_class_ap"] = {name: _finite_or_none(value) for name, value in per_class}
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def _metrics_markdown(
    metrics: MultiLabelMetrics, names: list[str], ap: Tensor, positives: Tensor
) -> str:
    """``metrics.markdown_table`` (the summary, without its per-class table in label order), then
    the classes from best AP to worst with their positives."""
    ranked, without = _by_ap(ap)
    lines = [
        metrics.markdown_table().rstrip("\n"),
        "",
        "## Per-class AP, best to worst",
        "",
        "| rank | class | AP | positives |",
        "|---:|---|---:|---:|",
    ]
    for rank, c in enumerate(ranked + without, start=1):
        value, escaped = ap[c].item(), names[c].replace("|", "\\|")
        rank_shown, shown = (rank, f"{100 * value:.2f}") if math.isfinite(value) else ("", "n/a")
        lines.append(f"| {rank_shown} | {escaped} | {shown} | {positives[c]} |")
    return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas, unknown to pyplot (no window, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _short(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"


def _by_ap(ap: Tensor) -> tuple[list[int], list[int]]:
    """Classes with a finite AP from best to worst (ties in label order), and the others."""
    finite = torch.isfinite(ap)
    ranked = torch.argsort(torch.where(finite, ap, -math.inf), descending=True, stable=True)
    return (
        [i for i in ranked.tolist() if finite[i]],
        [i for i in ranked.tolist() if not finite[i]],
    )


def _empty_note(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="0.4")


def _pr_curves_figure(
    scores: Tensor, targets: Tensor, names: list[str], ap: Tensor, positives: Tensor
) -> Figure:
    ranked, _ = _by_ap(ap)
    # Best, worst, median, then quartiles and eighths: spread over the range whatever its size.
    fractions = (0.0, 1.0, 0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875)
    positions: list[int] = []
    for fraction in fractions if ranked else ():
        position = round(fraction * (len(ranked) - 1))
        if position not in positions:
            positions.append(position)
    positions = sorted(positions[:MAX_PR_CLASSES])
    chosen = [ranked[p] for p in positions]

    figure = _figure(8.5, 5.5)
    axes = figure.add_axes((0.08, 0.1, 0.5, 0.82))
    for c in chosen:
        precision, recall, _ = precision_recall_curve(scores[:, c], targets[:, c])
        label = f"{_short(names[c])}\nAP {ap[c]:.3f}, {positives[c]} positives"
        axes.plot(recall.numpy(), precision.numpy(), drawstyle="steps-post", label=label)
    axes.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    axes.grid(alpha=0.3)
    if chosen:
        title = f"Precision-recall: {len(chosen)} of {len(ranked)} classes with positives"
        axes.legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), fontsize=8, labelspacing=0.9)
    else:
        title = "Precision-recall"
        _empty_note(axes, "no class has positives")
    axes.set_title(title, fontsize=10, loc="left")
    return figure


def _per_class_ap_figure(names: list[str], ap: Tensor, mean_ap: float) -> Figure:
    ranked, without = _by_ap(ap)
    order = ranked + without
    title = f"Per-class AP (mAP {mean_ap:.3f})" if math.isfinite(mean_ap) else "Per-class AP"
    if len(order) > MAX_BARS:
        half = MAX_BARS // 2
        title += f": the {half} best and {half} last of {len(order)} classes"
        order = order[:half] + order[-half:]
    count = len(order)
    figure = _figure(7.5, 1.2 + 0.22 * max(count, 4))
    height = figure.get_figheight()
    axes = figure.add_axes((0.34, 0.5 / height, 0.6, 1 - 0.95 / height))
    values = [ap[c].item() if math.isfinite(ap[c].item()) else 0.0 for c in order]
    colors = ["#4c72b0" if math.isfinite(ap[c].item()) else MISSED_COLOR for c in order]
    rows = list(range(count))
    axes.barh(rows, values, color=colors, height=0.75)
    for row, c in zip(rows, order, strict=True):
        value = ap[c].item()
        if not math.isfinite(value):
            axes.text(0.01, row, "no positives", va="center", fontsize=7, color="0.3")
        elif value > 0.9:  # the value inside the bar's end
            axes.text(
                value - 0.01,
                row,
                f"{value:.3f}",
                va="center",
                ha="right",
                fontsize=7,
                color="white",
            )
        else:
            axes.text(value + 0.01, row, f"{value:.3f}", va="center", fontsize=7, color="0.2")
    axes.set_yticks(rows, [_short(names[c]) for c in order], fontsize=8)
    axes.set_ylim(count - 0.5, -0.5)  # best at the top
    axes.set_xlim(0, 1)
    axes.set_xlabel("AP")
    axes.grid(axis="x", alpha=0.3)
    if math.isfinite(mean_ap):
        axes.axvline(mean_ap, color="black", linestyle="--", linewidth=1, label="mAP")
        axes.legend(loc="lower right", fontsize=8)
    if count == 0:
        _empty_note(axes, "no classes")
    figure.suptitle(title, fontsize=10, x=0.02, ha="left", y=1 - 0.12 / height, va="top")
    return figure


def _recall_by_size_figure(recall_by_size: dict[str, dict[str, float]]) -> Figure:
    bins = list(recall_by_size)
    recalls = [float(recall_by_size[b]["recall"]) for b in bins]
    counts = [int(recall_by_size[b]["objects"]) for b in bins]
    figure = _figure(max(5.0, 1.2 * len(bins) + 2), 4.0)
    axes = figure.add_axes((0.12, 0.15, 0.84, 0.74))
    positions = list(range(len(bins)))
    shown = [r if math.isfinite(r) else 0.0 for r in recalls]
    axes.bar(positions, shown, color="#4c72b0", width=0.6)
    for x, r, n in zip(positions, recalls, counts, strict=True):
        text = f"{r:.3f}\n{n} objects" if math.isfinite(r) else f"n/a\n{n} objects"
        axes.text(x, (r if math.isfinite(r) else 0.0) + 0.02, text, ha="center", fontsize=8)
    axes.set_xticks(positions, bins, fontsize=8)
    axes.set(ylim=(0, 1.15), ylabel="recall", xlabel="object area / image area")
    axes.grid(axis="y", alpha=0.3)
    if not bins:
        _empty_note(axes, "no size bins")
    axes.set_title("Recall by object size", fontsize=10, loc="left")
    return figure


def _image_for_display(image: Tensor) -> Tensor:
    """``Tensor[3 or 1, H, W]`` (uint8, or float of any range) as uint8 ``Tensor[h, w, 3]``.

    Subsampled to at most :data:`MAX_IMAGE_SIDE` pixels a side (the grid shows ~220); a float
    image (a normalizing transform's output) has its range stretched to [0, 255].
    """
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ShapeError(
            f"write_report: dataset images must be Tensor[3, H, W], got {shape_str(image)}"
        )
    step = max(1, math.ceil(max(image.shape[1:]) / MAX_IMAGE_SIDE))
    image = image.detach().cpu()[:, ::step, ::step].expand(3, -1, -1)
    if image.dtype != torch.uint8:
        image = image.float().nan_to_num()  # a NaN pixel shows as 0
        low, high = image.min(), image.max()
        image = ((image - low) * (255 / (high - low).clamp(min=1e-12))).round().to(torch.uint8)
    return image.permute(1, 2, 0).contiguous()


def _label_lines(
    scores: Tensor, targets: Tensor, names: list[str], threshold: float
) -> list[tuple[str, str]]:
    """One image's ``(text, color)`` lines: correct, then false positives, then missed."""
    predicted = scores >= threshold
    ranked = torch.argsort(scores, descending=True, stable=True).tolist()
    correct = [c for c in ranked if predicted[c] and targets[c] == 1]
    false = [c for c in ranked if predicted[c] and targets[c] == 0]
    missed = [c for c in ranked if not predicted[c] and targets[c] == 1]
    lines = [(f"✓ {_short(names[c])} {scores[c]:.2f}", CORRECT_COLOR) for c in correct]
    lines += [(f"✗ {_short(names[c])} {scores[c]:.2f}", FALSE_POSITIVE_COLOR) for c in false]
    lines += [(f"○ {_short(names[c])} {scores[c]:.2f}", MISSED_COLOR) for c in missed]
    if not lines:
        lines = [("(no labels, no predictions)", MISSED_COLOR)]
    if len(lines) > MAX_LABEL_LINES:
        hidden = len(lines) - (MAX_LABEL_LINES - 1)
        lines = lines[: MAX_LABEL_LINES - 1] + [(f"… {hidden} more", "black")]
    return lines


def _predictions_figure(
    scores: Tensor, targets: Tensor, names: list[str], dataset: Any, threshold: float
) -> Figure:
    """Up to 12 images spread evenly over the split, each above its label lines.

    One axes spans the figure, in inches from the top left, and every image is placed in it by
    its extent: a dozen axes of their own would take most of the report's time.
    """
    count = scores.shape[0]
    shown = torch.linspace(0, count - 1, min(GRID_IMAGES, count)).round().long().unique().tolist()
    rows = max(1, math.ceil(len(shown) / GRID_COLUMNS))
    cell_width, image_height, line_height, header = 2.9, 2.2, 0.17, 0.45
    cell_height = 0.2 + image_height + line_height * MAX_LABEL_LINES + 0.15
    width, height = GRID_COLUMNS * cell_width, header + rows * cell_height
    figure = _figure(width, height)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    for slot, index in enumerate(shown):
        row, column = divmod(slot, GRID_COLUMNS)
        left, top = column * cell_width + 0.1, header + row * cell_height
        axes.text(left, top + 0.15, f"#{index}", fontsize=8, va="bottom")
        image = _image_for_display(dataset[index]["image"])
        box_width, box_height = cell_width - 0.2, image_height
        scale = min(box_width / image.shape[1], box_height / image.shape[0])
        shown_width, shown_height = image.shape[1] * scale, image.shape[0] * scale
        extent = (left, left + shown_width, top + 0.2 + shown_height, top + 0.2)
        axes.imshow(image.numpy(), extent=extent, interpolation="antialiased", aspect="auto")
        lines = _label_lines(scores[index], targets[index], names, threshold)
        for line, (text, color) in enumerate(lines):
            y = top + 0.25 + image_height + line * line_height
            axes.text(left, y, text, fontsize=8, color=color, va="top")
    if not shown:
        axes.text(width / 2, height / 2, "no test images", ha="center", va="center", color="0.4")
    axes.text(
        0.1,
        0.12,
        f"Predictions at threshold {threshold:g}:  ✓ correct (green)   ✗ false positive (red)   "
        "○ missed (grey)",
        fontsize=9,
        va="top",
    )
    return figure
