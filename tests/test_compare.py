"""models.compare (make compare): the results table, and one end-to-end run on a tiny budget."""

from __future__ import annotations

import math

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


def test_option_takes_the_last_occurrence():
    assert compare._option(["--a", "1", "--b", "2", "--a", "3"], "--a", "0") == "3"
    assert compare._option(["--b", "2"], "--a", "0") == "0"


def test_end_to_end_on_a_tiny_budget(tmp_path):
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
