"""mlkernels.nn.AnchorGenerator and ProposalLayer: against torchvision's AnchorGenerator and RPN
pieces, shapes, gradients to the head, repr."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import mlkernels
from mlkernels import nn, reference


def test_anchor_generator_matches_torchvision_and_derives_stride():
    sizes, ratios = (32, 64, 128, 256), (0.5, 1.0, 2.0)
    features = torch.zeros(2, 8, 5, 7)
    image_size = (5 * 16, 7 * 16)
    tv = TvAnchorGenerator(sizes=(sizes,), aspect_ratios=(ratios,))
    images = ImageList(torch.zeros(2, 3, *image_size), [image_size] * 2)
    expected = tv(images, [features])[0]
    ours = nn.AnchorGenerator(sizes, ratios)
    assert ours.num_anchors_per_location == 12
    torch.testing.assert_close(ours(features, image_size), expected, rtol=0, atol=0)
    fixed = nn.AnchorGenerator(sizes, ratios, stride=16)
    torch.testing.assert_close(fixed(features), expected, rtol=0, atol=0)
    assert fixed(features).data_ptr() != fixed(features).data_ptr()  # a copy, each call
    assert fixed(features.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="AnchorGenerator: image_size must be given"):
        ours(features)
    assert "aspect_ratios=(0.5, 1.0, 2.0)" in repr(ours)
    with pytest.raises(ValueError, match="AnchorGenerator: image_size must be at least"):
        ours(features, (4, 100))
    assert ours(torch.zeros(1, 8, 0, 7), image_size).shape == (0, 4)


def test_anchor_generator_results_are_not_its_cache():
    features = torch.zeros(1, 8, 4, 5)
    layer = nn.AnchorGenerator((32, 64), (1.0,), stride=16)
    expected = layer(features).clone()
    layer(features).add_(1000)  # an in-place edit of a result
    torch.testing.assert_close(layer(features), expected, rtol=0, atol=0)


def test_anchor_generator_first_call_under_inference_mode_serves_training():
    features = torch.zeros(1, 8, 4, 5)
    layer = nn.AnchorGenerator((32, 64), (1.0,), stride=16)
    with torch.inference_mode():
        layer(features)
    deltas = torch.zeros(1, 4 * 5 * 2, 4, requires_grad=True)
    boxes = mlkernels.ops.decode_boxes(deltas, layer(features))
    boxes.sum().backward()  # saving inference tensors for backward would raise here
    assert deltas.grad is not None


def test_anchor_generator_sees_changed_settings():
    features = torch.zeros(1, 8, 4, 5)
    layer = nn.AnchorGenerator((32,), (1.0,), stride=16)
    layer(features)
    layer.sizes = (64.0,)
    expected = mlkernels.ops.generate_anchors((4, 5), 16, (64.0,), (1.0,))
    torch.testing.assert_close(layer(features), expected, rtol=0, atol=0)


def _layer(**kwargs):
    torch.manual_seed(0)
    layer = nn.ProposalLayer(8, sizes=(16, 32), aspect_ratios=(0.5, 1.0, 2.0), stride=8, **kwargs)
    with torch.no_grad():  # larger weights than the 0.01-std init, so proposals move and differ
        layer.predict.weight.normal_(std=0.2)
        layer.predict.bias.normal_(std=0.5)
    return layer


def test_proposal_layer_head_layout_and_propose():
    layer = _layer(post_nms_top_n=20, append_whole_image=True)
    features = torch.randn(2, 8, 4, 5)
    sizes = [(32, 40), (30, 36)]
    out = layer(features, sizes)
    a = 4 * 5 * 6
    assert out.anchors.shape == (a, 4)
    assert out.objectness.shape == (2, a) and out.deltas.shape == (2, a, 4)
    assert out.boxes.shape == (2, 21, 4) and out.scores.shape == (2, 21)
    # The head's channels: k objectness maps, then (dx, dy, dw, dh) per anchor, cell-major.
    raw = layer.predict(torch.relu(layer.conv(features)))
    cell, anchor = 2 * 5 + 3, 4  # row 2, column 3, anchor 4
    assert out.objectness[1, cell * 6 + anchor] == raw[1, anchor, 2, 3]
    torch.testing.assert_close(out.deltas[1, cell * 6 + anchor], raw[1, 6 + 4 * anchor :][:4, 2, 3])
    expected = reference.propose(
        out.anchors,
        out.deltas.detach(),
        out.objectness.detach(),
        sizes,
        post_nms_top_n=20,
        append_whole_image=True,
    )
    for ours, theirs in zip(out[:3], expected, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_proposal_layer_config_argument_overrides_its_settings_for_one_call():
    layer = _layer(post_nms_top_n=20)
    features = torch.randn(2, 8, 4, 5)
    sizes = [(32, 40), (30, 36)]
    other = mlkernels.ops.ProposeConfig(post_nms_top_n=7, append_whole_image=True)
    out = layer(features, sizes, other)
    assert out.boxes.shape == (2, 8, 4)
    expected = reference.propose(
        out.anchors, out.deltas.detach(), out.objectness.detach(), sizes, other
    )
    for ours, theirs in zip(out[:3], expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert layer(features, sizes).boxes.shape == (2, 20, 4)  # its own settings are unchanged
    with pytest.raises(TypeError, match="config must be a ProposeConfig"):
        layer(features, sizes, {"post_nms_top_n": 7})


def test_proposal_layer_gradients_reach_the_head():
    layer = _layer(post_nms_top_n=10)
    features = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = layer(features, torch.tensor([[32, 32], [32, 32]]))
    out.boxes.sum().backward()
    assert layer.predict.weight.grad is not None and layer.predict.weight.grad.abs().sum() > 0
    assert layer.conv.weight.grad.abs().sum() > 0 and features.grad.abs().sum() > 0


def test_proposal_layer_half_precision_head_proposes_in_float32():
    layer = _layer(post_nms_top_n=10)
    features = torch.randn(1, 8, 4, 4)
    expected = layer(features, [(32, 32)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(features, [(32, 32)])
    assert out.deltas.dtype == torch.float32 and out.boxes.dtype == torch.float32
    assert out.anchors.dtype == torch.float32
    torch.testing.assert_close(out.anchors, expected.anchors, rtol=0, atol=0)
    assert out.counts.item() > 0


def test_proposal_layer_repr_names_its_settings():
    text = repr(_layer(pre_nms_top_n=1000, iou_threshold=0.6))
    for part in (
        "k=6",
        "pre_nms_top_n=1000",
        "post_nms_top_n=256",
        "iou_threshold=0.6",
        "clamp=log(1000/16)",
        "AnchorGenerator(sizes=(16.0, 32.0)",
    ):
        assert part in text
    assert mlkernels.nn.Proposals._fields[:3] == ("boxes", "scores", "counts")
