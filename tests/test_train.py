"""The trainer (models.train), its checkpoints, --reference-ops, DDP and models.predict.

Tiny runs: a scenes benchmark of 32/9/7 images at 64 px (generated once per session in a temp
folder), the small_cnn backbone, 48 px inputs, one thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlkernels
import mlkernels.ops
from models import train as train_module
from models.baseline import Baseline, masked_bce_with_logits
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.distributed import Context, gather_predictions
from models.predict import main as predict_main
from models.registry import register_model
from models.train import Collate, SplitView, hflip, main

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scenes")


def tiny_args(scenes_dir: Path, out: Path, *extra: str) -> list[str]:
    """A run of 2 epochs x 4 steps of 8 images, small_cnn, 48 px, one thread."""
    return [
        "--data",
        f"scenes:{scenes_dir}",
        "--data-option",
        "num_images=(32, 9, 7)",
        "--data-option",
        "image_size=64",
        "--data-option",
        "progress=False",
        "--backbone",
        "small_cnn",
        "--no-pretrained",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--image-size",
        "48",
        "--threads",
        "1",
        "--lr",
        "0.01",
        "--no-progress",
        "--no-report",
        "--out",
        str(out),
        *extra,
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def reference_run(scenes_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (workers 0), with the plots."""
    out = tmp_path_factory.mktemp("run")
    args = tiny_args(scenes_dir, out)
    args.remove("--no-report")
    assert main(args) == 0
    return out


# ---- data pipeline ------------------------------------------------------------------------------


def test_hflip_mirrors_image_and_boxes():
    image = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(3, 2, 5)
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.5, 0.5, 5.0, 2.0]])
    flipped, flipped_boxes = hflip(image, boxes)
    assert torch.equal(flipped[:, :, 0], image[:, :, 4])
    assert torch.equal(flipped_boxes, torch.tensor([[3.0, 0.0, 5.0, 1.0], [0.0, 0.5, 3.5, 2.0]]))
    again, again_boxes = hflip(flipped, flipped_boxes)
    assert torch.equal(again, image) and torch.equal(again_boxes, boxes)


def test_collate_resizes_images_of_any_size_and_scales_boxes():
    samples = [
        {
            "image": torch.full((3, 20, 40), 255, dtype=torch.uint8),
            "labels": torch.tensor([1.0, 0.0, -1.0]),
            "boxes": torch.tensor([[4.0, 2.0, 40.0, 20.0]]),
            "box_classes": torch.tensor([0]),
            "index": 3,
        },
        {
            "image": torch.zeros((3, 10, 10), dtype=torch.uint8),
            "labels": torch.tensor([0.0, 1.0, 0.0]),
            "boxes": torch.zeros((0, 4)),
            "box_classes": torch.zeros(0, dtype=torch.int64),
            "index": 5,
        },
    ]
    batch = Collate(16)(samples)
    assert batch["images"].shape == (2, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert torch.allclose(batch["images"][0], torch.ones(3, 16, 16))
    assert torch.equal(batch["images"][1], torch.zeros(3, 16, 16))
    assert torch.equal(batch["boxes"][0], torch.tensor([[1.6, 1.6, 16.0, 16.0]]))
    assert batch["boxes"][1].shape == (0, 4)
    assert torch.equal(batch["index"], torch.tensor([3, 5]))
    assert torch.equal(batch["labels"][0], torch.tensor([1.0, 0.0, -1.0]))


def test_split_view_flips_deterministically_per_epoch_and_sample(scenes_dir, reference_run):
    from models.data import open_dataset

    dataset = open_dataset(
        f"scenes:{scenes_dir}", "train", num_images=(32, 9, 7), image_size=64, progress=False
    )
    view = SplitView(dataset, indices=[5, 2, 9], flip_seed=0)
    flips = []
    for epoch in range(4):
        view.set_epoch(epoch)
        for i in range(3):
            sample = view[i]
            assert sample["index"] == i
            original = dataset[view.indices[i]]
            same = torch.equal(sample["image"], original["image"])
            assert same or torch.equal(sample["image"], original["image"].flip(-1))
            assert torch.equal(view[i]["image"], sample["image"])  # the same coin, drawn again
            flips.append(not same)
    assert any(flips) and not all(flips)


def test_masked_bce_ignores_unknown_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5]], requires_grad=True)
    loss = masked_bce_with_logits(logits, torch.tensor([[1.0, -1.0, 0.0]]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, 1] == 0


# ---- training runs ------------------------------------------------------------------------------


def test_run_writes_checkpoints_logs_and_report(reference_run, capsys):
    out = reference_run
    for name in ("last.pt", "best.pt", "metrics.csv", "predictions_test.pt", "metrics.json"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert len(list(out.glob("*.png"))) >= 2
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 3
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["model_name"] == "baseline"
    assert len(state["class_names"]) == state["model"]["head.weight"].shape[0]
    predictions = torch.load(out / "predictions_test.pt")
    assert predictions["scores"].shape == (7, len(state["class_names"]))


def test_same_seed_same_weights_with_or_without_workers(scenes_dir, reference_run, tmp_path):
    assert main(tiny_args(scenes_dir, tmp_path, "--workers", "2")) == 0
    assert_same_weights(weights(tmp_path / "last.pt"), weights(reference_run / "last.pt"))


def test_resume_after_interruption_gives_the_uninterrupted_weights(
    scenes_dir, reference_run, tmp_path, monkeypatch, capsys
):
    saved = []

    def save_then_interrupt(path, state):
        save_checkpoint(path, state)
        saved.append(Path(path).name)
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt  # Ctrl-C right after epoch 1's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    assert main(tiny_args(scenes_dir, tmp_path)) == 130
    assert "--resume" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    monkeypatch.undo()
    assert main(tiny_args(scenes_dir, tmp_path, "--resume", str(tmp_path / "last.pt"))) == 0
    assert_same_weights(weights(tmp_path / "last.pt"), weights(reference_run / "last.pt"))
    resumed = load_checkpoint(tmp_path / "last.pt")
    assert [row["epoch"] for row in resumed["metrics"]] == [1, 2]
    reference = load_checkpoint(reference_run / "last.pt")
    assert resumed["metrics"][1]["val_mAP"] == reference["metrics"][1]["val_mAP"]


def test_bf16_autocast_and_reference_ops_run(scenes_dir, tmp_path, capsys):
    argv = tiny_args(scenes_dir, tmp_path, "--amp", "--reference-ops", "--epochs", "1")
    assert main(argv + ["--steps-per-epoch", "2"]) == 0
    out = capsys.readouterr().out
    assert "amp bf16" in out and "reference ops" in out
    assert mlkernels.ops.roi_align is not mlkernels.reference.roi_align  # restored
    assert load_checkpoint(tmp_path / "last.pt")["metrics"][0]["train_loss"] > 0


def test_threshold_chosen_on_val_is_the_test_threshold(scenes_dir, tmp_path, monkeypatch, capsys):
    seen = []

    def best_threshold(scores, targets, *, metric):
        seen.append((tuple(scores.shape), metric))
        return 0.37

    monkeypatch.setattr(mlkernels.metrics, "best_threshold", best_threshold)
    argv = tiny_args(scenes_dir, tmp_path, "--epochs", "1", "--threshold", "val", "--report")
    assert main(argv + ["--steps-per-epoch", "2"]) == 0
    assert seen == [((9, 27), "CF1")]  # the 9 val images, with the checkpoint the test uses
    assert "threshold 0.37 (best val CF1)" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["threshold"] == 0.37
    with pytest.raises(SystemExit):
        train_module.parse_args(["--threshold", "high"])
    assert train_module.parse_args(["--threshold", "0.3"]).threshold == 0.3
    assert train_module.parse_args([]).threshold == 0.5


def test_config_file_sets_options_and_the_command_line_overrides_it(scenes_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 3\nbatch-size = 4\noptimizer = "sgd"\ndropout = 0.25\n')
    args = train_module.parse_args(["--config", str(config), "--epochs", "1"])
    assert (args.epochs, args.batch_size, args.optimizer, args.dropout) == (1, 4, "sgd", 0.25)
    assert train_module.parse_args(["--no-pretrained"]).pretrained is False
    assert train_module.parse_args(["--pretrained", "w.pth"]).pretrained == "w.pth"
    assert train_module.parse_args([]).pretrained is True
    config.write_text("epochs = 3\nno_such_option = 1\n")
    with pytest.raises(train_module.UsageError, match="no_such_option"):
        train_module.parse_args(["--config", str(config)])


def test_lr_schedule_warmup_then_cosine_to_zero():
    args = train_module.parse_args(["--epochs", "2", "--warmup-epochs", "0.5"])
    factor = train_module.lr_factor(args, steps_per_epoch=10)
    assert [factor(s) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert factor(5) == 1.0 and factor(12) > factor(16) > factor(19) > 0.0 and factor(20) == 0.0


# ---- DDP ----------------------------------------------------------------------------------------


def test_gather_predictions_drops_the_samplers_padding():
    indices = torch.tensor([3, 0, 4, 1, 2, 0])  # 5 samples padded to 6, as DistributedSampler does
    scores = torch.arange(6.0).unsqueeze(1)
    gathered, targets = gather_predictions(Context(), indices, scores, scores * 10, 5)
    assert torch.equal(gathered.flatten(), torch.tensor([1.0, 3.0, 4.0, 0.0, 2.0]))
    assert torch.equal(targets.flatten(), 10 * gathered.flatten())
    with pytest.raises(RuntimeError, match="missing \\[4\\]"):
        gather_predictions(Context(), indices[indices != 4], scores[:5], scores[:5], 5)


def test_two_processes_of_batch_b_step_like_one_process_of_batch_2b(scenes_dir, tmp_path):
    """One SGD step with 2 gloo processes x 4 images == one step of 1 process x 8 images.

    DDP averages the two processes' gradients, each a mean over its 4 images: the mean over the
    8. That holds only without batch statistics: BatchNorm in training mode normalizes each
    process's 4 images by their own mean and variance, so --freeze-bn (running statistics; the
    scale and shift still learn). SGD, since Adam's first step (lr * g / |g|) turns float
    rounding differences of near-zero gradients into full-size steps. The val (9) and test (7)
    splits do not divide by 2: the gathered scores must drop DistributedSampler's padding."""
    # A large step (lr 10): the first layers' gradients are ~1e-5, and every layer must move
    # far more than the tolerance for the comparison to mean anything.
    common = ["--epochs", "1", "--steps-per-epoch", "1", "--optimizer", "sgd", "--lr", "10"]
    common += ["--freeze-bn"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    ddp_run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "models.train"]
        + tiny_args(scenes_dir, ddp, *common, "--batch-size", "4"),
        cwd=ROOT,
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert main(tiny_args(scenes_dir, single, *common, "--batch-size", "8")) == 0
        output, _ = ddp_run.communicate(timeout=120)
    finally:
        ddp_run.kill()
    assert ddp_run.returncode == 0, output
    assert "2 process(es)" in output
    stepped = weights(single / "last.pt")
    assert_same_weights(weights(ddp / "last.pt"), stepped, atol=1e-6)
    # The step moved every layer's weights far beyond that tolerance (else the test is void).
    options = train_module.parse_args(tiny_args(scenes_dir, single, *common))
    initial = train_module._build(options, stepped["head.weight"].shape[0], torch.device("cpu"))
    for key, value in initial.state_dict().items():
        if key.endswith("weight") and "bn" not in key and value.dim() > 1:
            assert (stepped[key] - value).abs().max() > 1e-4, key  # 100x the tolerance
    one, two = (torch.load(d / "predictions_test.pt") for d in (single, ddp))
    assert one["scores"].shape == two["scores"].shape == (7, stepped["head.weight"].shape[0])
    assert torch.equal(one["targets"], two["targets"])
    torch.testing.assert_close(two["scores"], one["scores"], atol=1e-5, rtol=0)


# ---- bad input ----------------------------------------------------------------------------------


class NaNLossBaseline(Baseline):
    def loss(self, outputs, batch):
        return super().loss(outputs, batch) * float("nan")


@register_model("test_nan_loss")
def build_nan_loss(num_classes, backbone, args):
    return NaNLossBaseline(num_classes, backbone)


def run_error(argv: list[str], capsys, entry=main) -> str:
    status = entry(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    return err


def test_bad_options_and_data_give_a_message_and_status_2(scenes_dir, tmp_path, capsys):
    args = tiny_args(scenes_dir, tmp_path / "out")
    err = run_error(args + ["--model", "no_such_model"], capsys)
    assert "unknown model 'no_such_model'" in err and "baseline" in err
    err = run_error(args + ["--backbone", "no_such_net"], capsys)
    assert "--backbone no_such_net" in err
    err = run_error(args + ["--data", "voc2007:" + str(tmp_path / "missing")], capsys)
    assert "missing" in err and "does not exist" in err
    empty = tmp_path / "voc"
    (empty / "ImageSets" / "Main").mkdir(parents=True)
    voc = ["--data", f"voc2007:{empty}", "--backbone", "small_cnn", "--no-pretrained"]
    err = run_error(voc + ["--out", str(tmp_path / "out")], capsys)
    assert f"--data voc2007:{empty}" in err and "Annotations not found" in err
    (empty / "Annotations").mkdir()
    (empty / "JPEGImages").mkdir()
    (empty / "Annotations" / "000001.xml").write_text("<annotation><object>")
    for split in ("train", "val", "trainval", "test"):
        (empty / "ImageSets" / "Main" / f"{split}.txt").write_text("000001\n")
    err = run_error(voc + ["--out", str(tmp_path / "out")], capsys)
    assert "000001.xml is not valid XML" in err
    err = run_error(args + ["--data", "imagenet"], capsys)
    assert "unknown dataset 'imagenet'" in err
    err = run_error(args + ["--model", "test_nan_loss"], capsys)
    assert "not finite" in err and "epoch 1, step 1" in err


def test_corrupt_dataset_cache_gives_a_message(reference_run, scenes_dir, tmp_path, capsys):
    corrupt = tmp_path / "scenes"
    corrupt.mkdir()
    args = tiny_args(corrupt, tmp_path / "out")
    # A scenes cache whose files were cut short: copy the good cache, truncate every file.
    for path in scenes_dir.rglob("*"):
        target = corrupt / path.relative_to(scenes_dir)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes()[:100])
    err = run_error(args, capsys)
    assert f"--data scenes:{corrupt}" in err


def test_bad_checkpoints_for_resume_and_predict(reference_run, scenes_dir, tmp_path, capsys):
    args = tiny_args(scenes_dir, tmp_path / "out")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((reference_run / "last.pt").read_bytes()[:5000])
    err = run_error(args + ["--resume", str(truncated)], capsys)
    assert "truncated or corrupt" in err
    other = tmp_path / "other.pt"
    state = load_checkpoint(reference_run / "last.pt")
    state.pop("format")
    save_checkpoint(other, {**state, "model_name": "test_nan_loss"})
    err = run_error(args + ["--resume", str(other)], capsys)
    assert "of model 'test_nan_loss', not of --model 'baseline'" in err
    plain = tmp_path / "plain.pt"
    torch.save(state["model"], plain)
    err = run_error(args + ["--resume", str(plain)], capsys)
    assert "not a models.train checkpoint" in err
    err = run_error(
        args + ["--resume", str(reference_run / "last.pt"), "--backbone", "resnet18"], capsys
    )
    assert "does not fit this model" in err
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (30, 20), (200, 30, 30)).save(image)
    for checkpoint in (truncated, plain, tmp_path / "missing.pt"):
        err = run_error(["--checkpoint", str(checkpoint), str(image)], capsys, predict_main)
        assert str(checkpoint) in err
    err = run_error(["--checkpoint", str(reference_run / "best.pt"), str(truncated)], capsys,
                    predict_main)  # fmt: skip
    assert "cannot be read" in err
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_predict_prints_labels_and_scores(reference_run, tmp_path, capsys):
    from PIL import Image

    paths = []
    for i, size in enumerate([(30, 20), (64, 64)]):
        paths.append(tmp_path / f"image{i}.png")
        Image.new("RGB", size, (20 * i, 100, 50)).save(paths[-1])
    status = predict_main(
        ["--checkpoint", str(reference_run / "best.pt"), "--top-k", "3", *map(str, paths)]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert out.count("labels:") == 2 and out.count("top-3:") == 2
    classes = load_checkpoint(reference_run / "best.pt")["class_names"]
    top = out.splitlines()[2].split(": ", 1)[1].split(", ")
    assert len(top) == 3 and all(entry.rsplit(" ", 1)[0] in classes for entry in top)
    scores = [float(entry.rsplit(" ", 1)[1]) for entry in top]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)


def test_command_line_error_exits_2_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "models.train", "--model", "no_such_model"],
        cwd=ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "models.train: error: --model: unknown model 'no_such_model'" in result.stderr
    assert "Traceback" not in result.stderr
