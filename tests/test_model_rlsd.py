"""RLSD (models/rlsd.py): shapes of both variants, one training step, gradients into the boxes,
save/load, the reference-ops twin, torch.compile, the losses, the ground-truth regions of
RLSD+ft-RPN, the global pre-training start and bad arguments.

Small and fast: the small_cnn backbone (stride 16), 64 px images, batches of 3, widths of 32."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import sgd_step_losses

import mlkernels
from models.backbones import build_backbone
from models.checkpoint import save_checkpoint
from models.registry import build_model, get_model
from models.rlsd import (
    RLSD,
    build_rlsd,
    cluster_regions,
    masked_bce,
    match_anchors,
    normalized_squared_loss,
)

C = 5
SIZE = 64


def make_model(seed: int = 0, **kwargs) -> RLSD:
    torch.manual_seed(seed)
    settings = dict(
        image_size=SIZE, regions=16, region_channels=8, region_fc=32, hidden=32, embed_dim=8,
        steps=3, dropout=0.0, rpn_hidden=16,
    )  # fmt: skip
    settings.update(kwargs)
    return RLSD(C, build_backbone("small_cnn", pretrained=False), **settings)


def make_batch(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 1, 0, -1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    boxes = [
        torch.tensor([[2.0, 3, 20, 30], [30, 30, 60, 60], [5, 5, 15, 15]]),
        torch.tensor([[10.0, 10, 40, 50], [12, 14, 38, 44]]),
        torch.zeros(0, 4),
    ]
    images = torch.rand(3, 3, SIZE, SIZE, generator=generator)
    return {"images": images, "labels": labels, "boxes": boxes}


@pytest.mark.parametrize("variant", ["regional", "global"])
def test_output_shapes_and_scores(variant: str) -> None:
    model, batch = make_model(variant=variant), make_batch()
    outputs = model(batch["images"])
    regions = 8 if variant == "regional" else 1  # training: M/2 = 8 proposals
    assert outputs["region_scores"].shape == (3, regions, C)
    assert outputs["boxes"].shape == (3, regions, 4)
    assert outputs["valid"].shape == (3, regions) and outputs["valid"].dtype == torch.bool
    assert outputs["steps"].shape == (3, regions, 3) and outputs["steps"].dtype == torch.int64
    if variant == "regional":
        anchors = (SIZE // 16) ** 2 * 12  # 4 x 4 cells, k = 12
        assert outputs["objectness"].shape == (3, anchors)
        assert outputs["deltas"].shape == (3, anchors, 4)
        assert outputs["anchors"].shape == (anchors, 4)
    else:
        torch.testing.assert_close(outputs["boxes"][0, 0], torch.tensor([0.0, 0, SIZE, SIZE]))
    assert model.loss(outputs, batch).shape == ()
    model.eval()
    with torch.no_grad():
        outputs = model(batch["images"])
    regions = 17 if variant == "regional" else 1  # test: M = 16 plus the whole image
    assert outputs["boxes"].shape == (3, regions, 4)
    scores = model.scores(outputs)
    assert scores.shape == (3, C) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    # The prediction is the max over the valid regions, which padding never wins.
    region_scores = outputs["region_scores"]
    assert bool((region_scores[~outputs["valid"]] == 0).all())
    torch.testing.assert_close(scores, region_scores.amax(dim=1))
    if variant == "regional":  # the whole image is the last valid region of every image
        last = outputs["valid"].sum(dim=1) - 1
        whole = outputs["boxes"][torch.arange(3), last]
        torch.testing.assert_close(whole, torch.tensor([[0.0, 0, SIZE, SIZE]] * 3))


def test_steps_after_end_count_for_nothing() -> None:
    model = make_model(variant="global")
    with torch.no_grad():  # make END the argmax of every step: nothing after step 0 counts
        model.classifier.bias[C] = 100.0
        probabilities, choices = model.decode(torch.randn(4, 32))
    assert bool((choices == C).all())
    assert bool((probabilities[:, 1:] == 0).all())
    assert bool((probabilities[:, 0].sum(dim=-1) - 1).abs().max() < 1e-5)


@pytest.mark.parametrize("box_supervision", [False, True])
def test_one_step_lowers_the_loss_and_reaches_every_parameter(box_supervision: bool) -> None:
    model, batch = make_model(box_supervision=box_supervision), make_batch()
    before, after = sgd_step_losses(model, batch, seed=3)
    assert after < before


def test_classification_loss_reaches_the_box_regression_through_roi_align() -> None:
    # No objectness loss: the localization head learns only from the boxes' gradients, which
    # flow from roi_align through ops.propose's decoding into the deltas.
    model, batch = make_model(objectness_weight=0.0), make_batch()
    model.loss(model(batch["images"]), batch).backward()
    k = model.localization.anchor_generator.num_anchors_per_location
    grad = model.localization.predict.weight.grad
    assert grad[k:].abs().sum() > 0, "no gradient reached the box deltas"
    assert grad[:k].abs().sum() == 0, "objectness got a gradient without its loss"


def test_state_dict_round_trip() -> None:
    model = make_model(seed=0).eval()
    images = make_batch()["images"]
    other = make_model(seed=1).eval()
    with torch.no_grad():
        expected = model(images)
        assert not torch.equal(other(images)["scores"], expected["scores"])
        other.load_state_dict(model.state_dict())
        got = other(images)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_reference_ops_give_the_same_forward_and_gradients(monkeypatch, training: bool) -> None:
    model, batch = make_model(box_supervision=True).train(training), make_batch()
    torch.manual_seed(5)
    fast = model(batch["images"])
    model.loss(fast, batch).backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls: list[str] = []
    for name in ("roi_align", "propose", "box_iou", "encode_boxes"):
        original = getattr(mlkernels.reference, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(mlkernels.reference, name, counting)
    torch.manual_seed(5)
    with mlkernels.reference.replacing_ops():
        slow = model(batch["images"])
        model.loss(slow, batch).backward()
    assert {"roi_align", "propose", "box_iou", "encode_boxes"} <= set(calls)
    for key in fast:
        torch.testing.assert_close(slow[key], fast[key], rtol=1e-4, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, fast_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_aot_eager_forward(training: bool) -> None:
    torch._dynamo.reset()
    model = make_model().train(training)
    images = make_batch()["images"]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(images)
        got = compiled(images)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_normalized_squared_loss_by_hand_and_ignored_labels() -> None:
    scores = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.0, 0.3]], requires_grad=True)
    labels = torch.tensor([[1.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    # Row 0: targets (0.5, 0.5), the third left out; row 1: all-zero targets.
    expected = ((0.5 - 0.5) ** 2 + (0.2 - 0.5) ** 2 + 0.1**2 + 0.0 + 0.3**2) / 2
    loss = normalized_squared_loss(scores, labels)
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert scores.grad[0, 2] == 0
    assert normalized_squared_loss(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0


def test_bce_ablation_loss_by_hand() -> None:
    scores = torch.tensor([[0.8, 0.1, 0.5]])
    labels = torch.tensor([[1.0, 0.0, -1.0]])
    expected = -(torch.tensor(0.8).log() + torch.tensor(0.9).log()) / 2
    torch.testing.assert_close(masked_bce(scores, labels), expected)
    model, batch = make_model(classification_loss="bce"), make_batch()
    outputs = model(batch["images"])
    objectness = model.objectness_weight * model.localization_loss(outputs, batch)
    torch.testing.assert_close(
        model.loss(outputs, batch), masked_bce(outputs["scores"], batch["labels"]) + objectness
    )


def test_cluster_regions_unites_near_centers() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 4, 16, 12], [100, 100, 120, 130], [50, 0, 60, 8]])
    regions = cluster_regions(boxes, distance=10.0)
    expected = {(0.0, 0.0, 16.0, 12.0), (100.0, 100.0, 120.0, 130.0), (50.0, 0.0, 60.0, 8.0)}
    assert {tuple(r) for r in regions.tolist()} == expected
    one = cluster_regions(boxes, distance=1000.0)
    torch.testing.assert_close(one, torch.tensor([[0.0, 0, 120, 130]]))
    assert cluster_regions(torch.zeros(0, 4), 5.0).shape == (0, 4)
    torch.testing.assert_close(cluster_regions(boxes[:1], 5.0), boxes[:1])
    with pytest.raises(ValueError, match="cluster_distance"):
        cluster_regions(boxes, 0.0)


def test_match_anchors_follows_the_rpn_thresholds() -> None:
    anchors = torch.tensor(
        [[0.0, 0, 10, 10], [0, 0, 9, 10], [0, 0, 5, 10], [50, 50, 60, 60], [20, 20, 40, 40]]
    )
    regions = torch.tensor([[0.0, 0, 10, 10], [22, 22, 42, 42]])
    labels, matched = match_anchors(anchors, regions)
    # IoU 1 and 0.9: positive; 0.5: neither; 0: negative; region 1's best anchor (IoU 0.68):
    # positive though under 0.7.
    assert labels.tolist() == [1.0, 1.0, -1.0, 0.0, 1.0]
    assert matched[[0, 1, 4]].tolist() == [0, 0, 1]
    labels, _ = match_anchors(anchors, torch.zeros(0, 4))
    assert labels.tolist() == [0.0] * 5


def test_global_checkpoint_starts_the_regional_model(tmp_path, capsys) -> None:
    global_model = make_model(seed=4, variant="global")
    path = save_checkpoint(
        tmp_path / "global.pt",
        {
            "model": global_model.state_dict(),
            "model_name": "rlsd",
            "class_names": [str(c) for c in range(C)],
            "args": {},
            "epoch": 1,
        },
    )
    args = argparse.Namespace(
        image_size=SIZE, regions=16, region_channels=8, region_fc=32, lstm_hidden=32,
        label_embed=8, rlsd_steps=3, region_dropout=0.0, rlsd_init=str(path),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_rlsd(C, build_backbone("small_cnn", pretrained=False), args)
    assert "tensors started from" in capsys.readouterr().out
    for name, tensor in global_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.localization is not None  # the regional parts keep their own initialization


def test_registered_with_its_options() -> None:
    entry = get_model("rlsd")
    parser = argparse.ArgumentParser()
    entry.add_arguments(parser)
    args = parser.parse_args(
        "--regions 8 --region-fc 16 --lstm-hidden 8 --label-embed 4 --rlsd-steps 2 "
        "--region-channels 4 --anchor-fractions 0.25,0.5 --aspect-ratios 1".split()
    )
    args.image_size = SIZE
    model = build_model("rlsd", C, build_backbone("small_cnn", pretrained=False), args)
    assert isinstance(model, RLSD)
    assert model.localization.anchor_generator.sizes == (16.0, 32.0)
    assert model.localization.anchor_generator.num_anchors_per_location == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--anchor-fractions", "a,b"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "local"}, "variant"),
        ({"classification_loss": "hinge"}, "classification_loss"),
        ({"regions": 1}, "regions"),
        ({"steps": 0}, "steps"),
        ({"dropout": 1.0}, "dropout"),
        ({"objectness_weight": -1.0}, "objectness_weight"),
        ({"cluster_distance": 0.0}, "cluster_distance"),
        ({"variant": "global", "box_supervision": True}, "box_supervision"),
        ({"region_fc": 2.5}, "region_fc"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"RLSD: {message}"):
        make_model(**kwargs)
    with pytest.raises(TypeError, match="RLSD: backbone"):
        RLSD(C, torch.nn.Identity(), image_size=SIZE)
