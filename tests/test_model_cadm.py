"""CADM (models/cadm.py): shapes, training step, save/load, reference ops, torch.compile, the
masked losses, the pictures and bad arguments. small_cnn backbone, 32-64 px images, tiny batches."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import sgd_step_losses
from hypothesis import given
from hypothesis import strategies as st

import mlkernels
from models.backbones import build_backbone
from models.cadm import CADM, add_arguments, correlation_embedding_loss, save_cadm_maps
from models.registry import build_model, model_names

NUM_CLASSES = 5


def make_model(seed: int = 0, **options) -> CADM:
    torch.manual_seed(seed)
    backbone = build_backbone("small_cnn", pretrained=False)
    options = {"embed_hidden": 32, "embed_dim": 16, **options}
    return CADM(NUM_CLASSES, backbone, **options)


def tiny_batch(size: int = 48, batch: int = 4, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    labels = torch.tensor(
        [[1, 0, 0, 1, 0], [0, 1, 1, 0, -1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.float32
    )[:batch]
    return {"images": images, "labels": labels}


@pytest.mark.parametrize("share_classifier", [False, True])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes(size, share_classifier):
    model = make_model(share_classifier=share_classifier, grid=5).eval()
    images = tiny_batch(size, batch=3)["images"]
    with torch.no_grad():
        outputs = model(images)
    side = size // 16  # small_cnn: stride 16
    assert outputs["maps"].shape == (3, NUM_CLASSES, side, side)
    for key in ("logits", "fcls", "scls"):
        assert outputs[key].shape == (3, NUM_CLASSES)
    assert outputs["embeddings"].shape == (3, NUM_CLASSES, 16)
    torch.testing.assert_close(outputs["logits"], (outputs["fcls"] + outputs["scls"]) / 2)
    torch.testing.assert_close(outputs["scls"], outputs["maps"].amax(dim=(2, 3)))
    scores = model.scores(outputs)
    assert scores.shape == (3, NUM_CLASSES) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert model.loss(outputs, {"labels": tiny_batch(batch=3)["labels"]}).dim() == 0


def test_shared_classifier_maps_use_the_linear_weights():
    model = make_model(share_classifier=True).eval()
    assert model.theta is None
    features = torch.randn(2, model.backbone.channels, 3, 3)
    expected = torch.einsum("cd,bdhw->bchw", model.classifier.weight, features)
    torch.testing.assert_close(model.class_maps(features), expected, rtol=1e-5, atol=1e-5)


def test_one_optimizer_step_lowers_the_loss():
    before, after = sgd_step_losses(make_model(), tiny_batch())
    assert after < before


def test_state_dict_round_trip_gives_the_same_outputs(tmp_path):
    model = make_model(seed=0).eval()
    path = tmp_path / "cadm.pt"
    torch.save(model.state_dict(), path)
    other = make_model(seed=1).eval()
    images = tiny_batch()["images"]
    with torch.no_grad():
        expected = model(images)
        assert not torch.allclose(other(images)["logits"], expected["logits"])
        other.load_state_dict(torch.load(path, weights_only=True))
        got = other(images)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_reference_ops_forward_and_gradients_match(monkeypatch):
    model = make_model().eval()
    images = tiny_batch()["images"]
    batch = tiny_batch()
    fast = model(images)
    model.loss(fast, batch).backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    calls = []

    def counting_roi_align(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    original = mlkernels.reference.roi_align
    monkeypatch.setattr(mlkernels.reference, "roi_align", counting_roi_align)
    with mlkernels.reference.replacing_ops():
        slow = model(images)
        model.loss(slow, batch).backward()
    assert calls == [1], "the model did not look roi_align up in mlkernels.ops at call time"
    for key in fast:
        torch.testing.assert_close(slow[key], fast[key], rtol=1e-4, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, fast_grads[name], rtol=1e-4, atol=1e-5)


def test_torch_compile_forward_matches_eager():
    # backend "aot_eager": traces forward and backward through mlkernels' fake kernels, no codegen
    torch._dynamo.reset()
    model = make_model().eval()
    images = tiny_batch(size=32)["images"]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(images)
        got = compiled(images)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_ignored_labels_do_not_reach_the_loss():
    model = make_model()
    batch = tiny_batch()
    outputs = model(batch["images"])
    logits = outputs["logits"].detach().requires_grad_(True)
    embeddings = outputs["embeddings"].detach().requires_grad_(True)
    loss = model.loss({"logits": logits, "embeddings": embeddings}, batch)
    loss.backward()
    ignored = batch["labels"] == -1
    assert bool(ignored.any())
    assert bool((logits.grad[ignored] == 0).all())
    assert bool((embeddings.grad[ignored] == 0).all())
    assert bool((logits.grad[~ignored] != 0).all())
    # The ignored entries' values do not matter.
    changed = {"logits": logits.detach().clone(), "embeddings": embeddings.detach().clone()}
    changed["logits"][ignored] = 50.0
    changed["embeddings"][ignored] = 7.0
    torch.testing.assert_close(model.loss(changed, batch), loss.detach())
    everything_ignored = {"labels": torch.full_like(batch["labels"], -1.0)}
    assert model.loss(outputs, everything_ignored).item() == 0.0


def test_correlation_loss_of_a_hand_built_case():
    # Class 0: positives at (0, 0) and (2, 0), center (1, 0), each at distance 1: pull 1.
    # Negatives at (1, 0.5) (distance 0.5: (1 - 0.5)^2) and (5, 0) (beyond the margin): push 0.125.
    # Class 1 has no positive: left out of the mean.
    embeddings = torch.zeros(4, 2, 2)
    embeddings[:, 0] = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.5], [5.0, 0.0]])
    embeddings[:, 1] = torch.randn(4, 2)
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
    loss = correlation_embedding_loss(embeddings, labels, margin=1.0)
    torch.testing.assert_close(loss, torch.tensor(1.125))


@given(
    batch=st.integers(1, 6),
    classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    margin=st.floats(0.1, 3.0),
)
def test_correlation_loss_properties(batch, classes, seed, margin):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, classes, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(-1, 2, (batch, classes), generator=generator).double()
    loss = correlation_embedding_loss(embeddings, labels, margin)
    assert torch.isfinite(loss) and loss.item() >= 0
    # Invariant to the order of the batch and of the classes.
    order, class_order = torch.randperm(batch), torch.randperm(classes)
    shuffled = correlation_embedding_loss(
        embeddings[order][:, class_order], labels[order][:, class_order], margin
    )
    torch.testing.assert_close(shuffled, loss)
    # Positives all at one point and negatives beyond the margin: nothing to pay.
    far = embeddings.clone()
    far[labels == 1] = 0.0
    far[labels != 1] = margin + 1.0
    assert correlation_embedding_loss(far, labels, margin).item() < 1e-9


def test_registered_with_its_options():
    assert "cadm" in model_names()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--embed-dim", "8", "--embed-hidden", "12", "--map-grid", "3"])
    assert args.corr_weight == 0.5 and args.corr_margin == 1.0
    model = build_model("cadm", NUM_CLASSES, build_backbone("small_cnn", pretrained=False), args)
    assert isinstance(model, CADM) and model.grid == 3
    with torch.no_grad():
        outputs = model.eval()(torch.rand(2, 3, 32, 32))
    assert outputs["embeddings"].shape == (2, NUM_CLASSES, 8)


def test_corr_weight_zero_is_plain_bce():
    from models.baseline import masked_bce_with_logits

    model = make_model(corr_weight=0.0)
    batch = tiny_batch()
    outputs = model(batch["images"])
    torch.testing.assert_close(
        model.loss(outputs, batch), masked_bce_with_logits(outputs["logits"], batch["labels"])
    )


def test_save_cadm_maps_writes_a_png(tmp_path):
    model = make_model()
    batch = tiny_batch(size=32, batch=2)
    path = save_cadm_maps(
        model, batch["images"], batch["labels"], tmp_path / "sub" / "maps.png", top_k=2
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="save_cadm_maps: top_k must be in"):
        save_cadm_maps(model, batch["images"], None, tmp_path / "x.png", top_k=NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="save_cadm_maps: labels must be"):
        save_cadm_maps(model, batch["images"], batch["labels"][:, :2], tmp_path / "x.png")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"corr_weight": -0.1}, "CADM: corr_weight must be >= 0, got -0.1"),
        ({"margin": 0.0}, "CADM: margin must be > 0, got 0.0"),
        ({"grid": 0}, "CADM: grid must be >= 1, got 0"),
        ({"embed_dim": 0}, "CADM: embed_dim must be >= 1, got 0"),
        ({"embed_hidden": -3}, "CADM: embed_hidden must be >= 1, got -3"),
    ],
)
def test_bad_constructor_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        make_model(**options)


def test_bad_num_classes_and_backbone():
    backbone = build_backbone("small_cnn", pretrained=False)
    with pytest.raises(ValueError, match="CADM: num_classes must be >= 1, got 0"):
        CADM(0, backbone)
    with pytest.raises(TypeError, match="CADM: backbone must be an nn.Module with an int"):
        CADM(3, torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="correlation_embedding_loss: embeddings must be"):
        correlation_embedding_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_trains_from_the_cli_and_draws_maps_from_its_checkpoint(tmp_path, capsys):
    from PIL import Image

    from models import cadm
    from models.train import main

    out = tmp_path / "run"
    argv = [
        "--model", "cadm", "--embed-dim", "8", "--embed-hidden", "16",
        "--data", f"scenes:{tmp_path / 'scenes'}", "--data-option", "num_images=(16, 8, 8)",
        "--data-option", "image_size=48", "--data-option", "progress=False",
        "--backbone", "small_cnn", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
        "--image-size", "32", "--threads", "1", "--no-progress", "--no-report", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    image = tmp_path / "image.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()).save(image)
    capsys.readouterr()
    assert (
        cadm.main(["--checkpoint", str(out / "best.pt"), str(image), "--out", str(out / "m.png")])
        == 0
    )
    assert (out / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert cadm.main(["--checkpoint", str(out / "missing.pt"), str(image)]) == 2
    assert "models.cadm: error: checkpoint" in capsys.readouterr().err


def test_bf16_autocast_loss_is_float32_and_close_to_float32():
    model = make_model().eval()
    batch = tiny_batch(size=32)
    with torch.no_grad():
        expected = model.loss(model(batch["images"]), batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(batch["images"])
            loss = model.loss(outputs, batch)
    assert outputs["maps"].dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
