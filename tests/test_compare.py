"""models.compare (make compare): the results table, and one end-to-end run on a tiny budget."""

from __future__ import annotations

import math

import pytest

from models import compare


def _metrics(mAP: float, small: float) -> dict:
    return {
        "mAP": mAP,
        "CF1": 0.5,
        "OF1": 0.6,
        "topk": {"CF1": 0.4, "OF1": 0.45},
        "mAP_small": small,
        "recall_by_size": {"small (<1%)": {"recall": 0.3, "objects": 10}},
    }


def test_table_marks_who_beats_the_baseline():
    results = [
        compare.ModelResult("baseline", _metrics(0.70, 0.40), 74.0, 80.0),
        compare.ModelResult("better", _metrics(0.75, 0.35), 90.0, 200.0),
        compare.ModelResult("worse", _metrics(0.60, math.nan), 60.0, None),
    ]
    text = compare.results_markdown(results, ["--epochs", "2"])
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    cells = {name: [c.strip() for c in row.strip("|").split("|")] for name, row in rows.items()}
    assert cells["baseline"][1:3] == ["70.00", "50.00"] and cells["baseline"][8:10] == ["—", "—"]
    assert cells["better"][8:] == ["yes", "**no**", "90", "200"]
    assert cells["worse"][6] == "n/a" and cells["worse"][8:] == ["**no**", "n/a", "60", "n/a"]
    assert "`--epochs 2`" in text
    assert "baseline calls no mlkernels op" in text  # the timing's noise control


def test_option_takes_the_last_occurrence():
    assert compare._option(["--a", "1", "--b", "2", "--a", "3"], "--a", "0") == "3"
    assert compare._option(["--b", "2"], "--a", "0") == "0"


def test_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch):
    tiny = (
        f"--data scenes:{tmp_path / 'scenes'} --data-option num_images=(16,4,4) "
        "--data-option image_size=32 --data-option progress=False --backbone small_cnn "
        "--no-pretrained --epochs 1 --batch-size 4 --train-images 8 --threads 1 --image-size 32"
    ).split()
    results = tmp_path / "RESULTS.md"
    argv = ["--models", "baseline", "--out", str(tmp_path / "runs"), "--results", str(results)]
    assert compare.main([*argv, "--timing-steps", "1", "--", *tiny]) == 0
    text = results.read_text()
    assert "| baseline |" in text and "--train-images 8" in text
    assert compare.main(["--models", "nonexistent"]) == 2

    # --reuse keeps the three finished runs (training and both timings): nothing runs again.
    def no_training(*args, **kwargs):
        raise AssertionError("--reuse ran a finished run again")

    monkeypatch.setattr(compare.subprocess, "run", no_training)
    results.unlink()
    assert compare.main([*argv, "--reuse", "--timing-steps", "1", "--", *tiny]) == 0
    assert results.read_text().splitlines()[7:] == text.splitlines()[7:]
    with pytest.raises(AssertionError, match="--reuse ran"):  # another command is not reused
        compare.main([*argv, "--reuse", "--timing-steps", "2", "--", *tiny])


def test_ablations_table_and_model_options(monkeypatch):
    monkeypatch.setattr(compare, "MODEL_OPTIONS", {"worse": ("--width", "8")})
    results = [
        compare.ModelResult("baseline", _metrics(0.70, 0.40), 74.0, 80.0),
        compare.ModelResult("worse", _metrics(0.60, 0.30), 60.0, 61.0),
    ]
    ablations = [
        compare.ModelResult(
            "worse", _metrics(0.65, 0.35), None, None, "no extra loss", ("--extra-weight", "0")
        )
    ]
    text = compare.results_markdown(results, ["--epochs", "2"], ablations)
    assert "- worse: `--width 8`" in text
    row = next(line for line in text.splitlines() if line.startswith("| worse: no extra loss"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "`--extra-weight 0`" and cells[2] == "65.00"
    assert cells[-2:] == ["+5.00", "-5.00"]  # against the model's 60 and the baseline's 70


def test_ablations_run_only_for_models_behind_the_baseline(monkeypatch, tmp_path):
    maps = {"baseline": 0.70, "ahead": 0.80, "behind": 0.60}

    def fake_run_model(name, out, budget, timing_steps, *, reuse=False):
        return compare.ModelResult(name, _metrics(maps[name], 0.3), 1.0, 2.0)

    trained = []

    def fake_run_ablation(ablation, index, out, budget, *, reuse=False):
        trained.append((ablation.model, index))
        return compare.ModelResult(
            ablation.model, _metrics(0.5, 0.3), None, None, ablation.change, ablation.options
        )

    monkeypatch.setattr(compare, "model_names", lambda: sorted(maps))
    monkeypatch.setattr(compare, "run_model", fake_run_model)
    monkeypatch.setattr(compare, "run_ablation", fake_run_ablation)
    monkeypatch.setattr(
        compare,
        "ABLATIONS",
        (
            compare.Ablation("ahead", "a", ("--a",)),
            compare.Ablation("behind", "b", ("--b",)),
            compare.Ablation("behind", "c", ("--c",)),
        ),
    )
    results = tmp_path / "RESULTS.md"
    assert compare.main(["--results", str(results)]) == 0
    assert trained == [("behind", 1), ("behind", 2)]
    assert "| behind: c | `--c` |" in results.read_text()
    trained.clear()
    assert compare.main(["--results", str(results), "--no-ablations"]) == 0
    assert trained == [] and "## Ablations" not in results.read_text()
