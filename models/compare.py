"""``make compare``: every model trained with one budget on one benchmark, side by side.

    python -m models.compare                        # every registered model, the default budget
    python -m models.compare --models baseline,cadm --out runs/compare --results models/RESULTS.md
    python -m models.compare -- --epochs 5          # after "--": options for every models.train run

Each model runs ``python -m models.train`` in a process of its own, with the same options (the
budget: dataset, image size, epochs, images, batch, optimizer), then twice more for a few steps,
once with the mlkernels ops and once with ``--reference-ops``, to time an epoch both ways on the
same inputs. The results table goes to ``--results`` (``models/RESULTS.md``): test mAP, CF1, OF1,
their top-3 variants, mAP and recall on small objects, and the seconds per training epoch; each
model is marked as beating the baseline or not, overall and on small objects (the papers' claims).

Some models take options of their own on top of the budget (:data:`MODEL_OPTIONS`: widths shrunk
to fit the CPU budget), listed under the table. Then the ablations (:data:`ABLATIONS`, skipped
with ``--no-ablations``): each model that did not beat the baseline is trained again with one
part changed, so that the table says what costs it (trained once each, not timed).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import written_atomically
from .registry import model_names

# make demo's settings (the budget the baseline's README numbers were measured with), and the
# F1 threshold chosen on val: RLSD's and label ranking's scores are not calibrated around 0.5.
DEFAULT_BUDGET = (
    "--data scenes --image-size 128 --epochs 2 --train-images 4000 --val-images 500 "
    "--batch-size 64 --lr 0.001 --schedule cosine --threads 2 --threshold val"
).split()


# Each model's own options in every run of make compare (on top of the budget): the paper's
# widths where they do not fit the 2-core budget (RLSD: 4096-unit layers on 128 regions per image).
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "rlsd": ("--regions", "16", "--region-fc", "512", "--lstm-hidden", "256"),
}


# Models that call no mlkernels op: their two timing columns differ by the measurement's noise.
NO_MLKERNELS_OPS = ("baseline", "label_ranking")


@dataclass(frozen=True)
class Ablation:
    """One model trained again with ``options`` added: what ``change`` costs or gives."""

    model: str
    change: str
    options: tuple[str, ...]


# One part of each model changed at a time: what the model's own idea gives on this budget.
ABLATIONS: tuple[Ablation, ...] = (
    Ablation("cadm", "no label-correlation loss", ("--corr-weight", "0")),
    Ablation("cmsg", "no label graph", ("--cmsg-correlation", "none")),
    Ablation("order_free_rnn", "ranked by the classifier alone", ("--of-scores", "classifier")),
    Ablation("rlsd", "global CNN+LSTM (no regions)", ("--rlsd-variant", "global")),
    Ablation("label_ranking", "mean of the positives vs each negative", ("--rank-pairing", "mean")),
    Ablation("rlsd", "BCE instead of the squared loss", ("--rlsd-loss", "bce")),
)


@dataclass
class ModelResult:
    """One row of the table (fractions in [0, 1], seconds; no timing for an ablation)."""

    model: str
    metrics: dict
    seconds_per_epoch: float | None
    reference_seconds_per_epoch: float | None
    change: str | None = None  # an ablation's change (None: the model as it is)
    options: tuple[str, ...] = ()  # an ablation's options

    @property
    def label(self) -> str:
        return self.model if not self.change else f"{self.model}: {self.change}"


def _train(model: str, out: Path, options: list[str], *, reuse: bool = False) -> None:
    """Run ``models.train`` into ``out``; with ``reuse``, a finished run of the same command
    (``out/command.json``, written when it finished) is kept instead."""
    command = [sys.executable, "-m", "models.train", "--model", model, "--out", str(out)]
    command += ["--no-progress", *options]
    record = out / "command.json"
    if reuse and record.is_file() and json.loads(record.read_text()) == command[1:]:
        print(f"models.compare: reusing {out} (the same command finished there)", flush=True)
        return
    print("$", " ".join(command), flush=True)
    record.unlink(missing_ok=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"models.compare: training {model} failed (exit {done.returncode})")
    record.write_text(json.dumps(command[1:]))


def _images_per_second(out: Path) -> float:
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise RuntimeError(f"models.compare: {out / 'metrics.csv'} has no epoch")
    return sum(float(row["images_per_s"]) for row in rows) / len(rows)


def _option(options: list[str], name: str, default: str) -> str:
    """The value of ``name`` in an argv list (its last occurrence), else ``default``."""
    value = default
    for i, item in enumerate(options[:-1]):
        if item == name:
            value = options[i + 1]
    return value


def run_model(
    model: str, out: Path, budget: list[str], timing_steps: int, *, reuse: bool = False
) -> ModelResult:
    """Train ``model`` with ``budget`` (and its :data:`MODEL_OPTIONS`) into ``out/model``, then
    time ``timing_steps`` steps with and without ``--reference-ops``; the seconds per epoch are the
    training images of the budget divided by the measured images per second (validation not
    included)."""
    budget = [*budget, *MODEL_OPTIONS.get(model, ())]
    _train(model, out / model, budget, reuse=reuse)
    metrics = json.loads((out / model / "metrics.json").read_text())
    train_images = int(_option(budget, "--train-images", "8000"))
    timing = [*budget, "--epochs", "1", "--steps-per-epoch", str(timing_steps), "--no-report"]
    seconds = {}
    for label, extra in (("ours", []), ("reference", ["--reference-ops"])):
        folder = out / f"{model}-timing-{label}"
        _train(model, folder, [*timing, *extra], reuse=reuse)
        seconds[label] = train_images / _images_per_second(folder)
    return ModelResult(model, metrics, seconds["ours"], seconds["reference"])


def run_ablation(
    ablation: Ablation, index: int, out: Path, budget: list[str], *, reuse: bool = False
) -> ModelResult:
    """Train ``ablation.model`` with its own options and the ablation's into ``out``."""
    options = [*budget, *MODEL_OPTIONS.get(ablation.model, ()), *ablation.options]
    folder = out / f"{ablation.model}-ablation-{index}"
    _train(ablation.model, folder, options, reuse=reuse)
    metrics = json.loads((folder / "metrics.json").read_text())
    return ModelResult(ablation.model, metrics, None, None, ablation.change, ablation.options)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _small_recall(metrics: dict) -> float | None:
    bins = metrics.get("recall_by_size") or {}
    small = next((entry for label, entry in bins.items() if label.startswith("small")), None)
    return None if small is None else small["recall"]


def _beats(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline):
        return "n/a"
    return "yes" if value > baseline else "**no**"


def _metric_cells(metrics: dict) -> list[str]:
    topk = metrics.get("topk") or {}
    return [
        _percent(metrics["mAP"]),
        _percent(metrics["CF1"]),
        _percent(metrics["OF1"]),
        _percent(topk.get("CF1")),
        _percent(topk.get("OF1")),
        _percent(metrics.get("mAP_small")),
        _percent(_small_recall(metrics)),
    ]


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _difference(value: float, other: float | None) -> str:
    if other is None or math.isnan(value) or math.isnan(other):
        return "n/a"
    return f"{100 * (value - other):+.2f}"


_METRIC_HEADER = "| mAP | CF1 | OF1 | top-3 CF1 | top-3 OF1 | mAP small | recall small "


def results_markdown(
    results: list[ModelResult],
    budget: list[str],
    ablations: list[ModelResult] | None = None,
    timing_steps: int = 10,
) -> str:
    """The tables of ``models/RESULTS.md``: the models, then (when given) the ablations."""
    baseline = next((r for r in results if r.model == "baseline" and not r.change), None)
    base_map = None if baseline is None else baseline.metrics["mAP"]
    base_small = None if baseline is None else baseline.metrics.get("mAP_small")
    lines = [
        "# Models compared on one budget",
        "",
        "Generated by `make compare` (`python -m models.compare`); do not edit by hand.",
        f"Budget (every model): `{' '.join(budget)}`; the scenes test split; values in percent.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}.",
        "",
        "| model " + _METRIC_HEADER
        + "| beats baseline | beats baseline on small | s/epoch | s/epoch reference ops |",
        "|---|" + "---:|" * 9 + "---:|---:|",
    ]  # fmt: skip
    for r in results:
        is_baseline = r.model == "baseline"
        row = [
            r.label,
            *_metric_cells(r.metrics),
            "—" if is_baseline else _beats(r.metrics["mAP"], base_map),
            "—" if is_baseline else _beats(r.metrics.get("mAP_small"), base_small),
            _seconds(r.seconds_per_epoch),
            _seconds(r.reference_seconds_per_epoch),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Seconds per epoch: the training images of the budget over the images per second of a "
        f"short run ({timing_steps} steps, validation not included), with the mlkernels ops "
        "and with `--reference-ops` (their pure-PyTorch twins), on the same inputs, the "
        "mlkernels run first.",
    ]
    controls = [r.model for r in results if r.model in NO_MLKERNELS_OPS and not r.change]
    if controls:
        lines[-1] += (
            f" {' and '.join(controls)} {'call' if len(controls) > 1 else 'calls'} no mlkernels "
            "op: the gap between the two columns there is the noise of this measurement."
        )
    shrunk = [r.model for r in results if r.model in MODEL_OPTIONS]
    if shrunk:
        lines += ["", "Each run of these models also had its own options:"]
        lines += [f"- {name}: `{' '.join(MODEL_OPTIONS[name])}`" for name in shrunk]
    if ablations:
        own = {r.model: r.metrics for r in results if not r.change}
        lines += [
            "",
            "## Ablations",
            "",
            "Each model trained again on the same budget with one change; the last two columns "
            "are its mAP minus the model's and minus the baseline's, in points.",
            "",
            "| model: change | options " + _METRIC_HEADER + "| mAP vs model | mAP vs baseline |",
            "|---|---|" + "---:|" * 9,
        ]
        for r in ablations:
            row = [
                r.label,
                f"`{' '.join(r.options)}`" if r.options else "",
                *_metric_cells(r.metrics),
                _difference(r.metrics["mAP"], (own.get(r.model) or {}).get("mAP")),
                _difference(r.metrics["mAP"], base_map),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(prog="models.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated (default: every model)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--results", type=Path, default=Path("models/RESULTS.md"))
    parser.add_argument("--timing-steps", type=int, default=10, help="steps timed per way")
    parser.add_argument(
        "--ablations",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the ablations of the models that do not beat the baseline",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs in --out that finished with the same command (resume a long compare)",
    )
    args = parser.parse_args(argv)
    known = model_names()
    names = known if args.models is None else [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        print(f"models.compare: unknown models {unknown}; known: {known}", file=sys.stderr)
        return 2
    if "baseline" in names:  # first, so that the others are read against it
        names = ["baseline"] + [n for n in names if n != "baseline"]
    budget = [*DEFAULT_BUDGET, *extra]
    results = [
        run_model(name, args.out, budget, args.timing_steps, reuse=args.reuse) for name in names
    ]
    ablations = []
    if args.ablations:
        base_map = next((r.metrics["mAP"] for r in results if r.model == "baseline"), -math.inf)
        behind = {
            r.model for r in results if r.model != "baseline" and r.metrics["mAP"] <= base_map
        }
        ablations = [
            run_ablation(ablation, i, args.out, budget, reuse=args.reuse)
            for i, ablation in enumerate(ABLATIONS)
            if ablation.model in behind
        ]
    text = results_markdown(results, budget, ablations, args.timing_steps)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(args.results) as temporary:
        temporary.write_text(text)
    print(text)
    print(f"written: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
