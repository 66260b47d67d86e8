"""The Order-Free RNN model (models/order_free_rnn.py): shapes, one training step, the order-free
teacher forcing, save/load, the reference-ops twin, torch.compile, -1 labels, bad arguments.

Small and fast: the small_cnn backbone, 48 px images, batches of 3, widths of 16."""

from __future__ import annotations

import argparse
import io

import pytest
import torch

import mlkernels
from models.backbones import build_backbone
from models.order_free_rnn import OrderFreeRNN, build_order_free_rnn, save_attention_maps
from models.registry import build_model, get_model

C = 7


def make_model(seed: int = 0, **kwargs) -> OrderFreeRNN:
    torch.manual_seed(seed)
    settings = dict(feature_size=16, hidden_size=16, head_size=16, max_length=3, beam_size=2)
    settings.update(kwargs)
    return OrderFreeRNN(C, build_backbone("small_cnn", pretrained=False), **settings)


def make_batch(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(
        [[1, 0, 1, 0, 0, -1, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]],
        dtype=torch.float32,
    )
    return {"images": torch.rand(3, 3, 48, 48, generator=generator), "labels": labels}


def test_output_shapes_and_scores_in_unit_range() -> None:
    model, batch = make_model(), make_batch()
    outputs = model(batch["images"])
    assert outputs["v_logits"].shape == (3, C)
    assert outputs["features"].shape == (3, 9, 16)  # 48 px / stride 16 = 3 x 3 positions
    assert model.loss(outputs, batch).shape == ()
    model.eval()
    with torch.no_grad():
        outputs = model(batch["images"])
    assert outputs["labels"].shape == (3, 2, 3)
    assert outputs["labels"].dtype == torch.int64
    assert outputs["beam_scores"].shape == (3, 2)
    assert outputs["label_probs"].shape == (3, C)
    scores = model.scores(outputs)
    assert scores.shape == (3, C)
    assert bool(((scores >= 0) & (scores <= 1)).all())
    # q is nonzero exactly for the labels of some beam, and each path repeats no label.
    labels = outputs["labels"]
    for b in range(3):
        decoded = set(labels[b][labels[b] >= 0].tolist())
        assert set(outputs["label_probs"][b].nonzero().flatten().tolist()) == decoded
        for path in labels[b]:
            path = path[path >= 0].tolist()
            assert len(path) == len(set(path))
    expected = 0.5 * (torch.sigmoid(outputs["v_logits"]) + outputs["label_probs"])
    torch.testing.assert_close(scores, expected)


def test_decoder_label_probs_match_path_scores() -> None:
    """The rerun's per-step probabilities multiply to each beam's path probability."""
    model, batch = make_model(threshold=0.0).eval(), make_batch()
    with torch.no_grad():
        features, v_logits, _ = model.encode(batch["images"])
        decoded = model.decode(features, v_logits)
        rows = features.repeat_interleave(2, 0)
        v_pred = torch.sigmoid(v_logits).repeat_interleave(2, 0)
        paths = decoded["labels"].reshape(6, -1)
        probs, maps = model.rerun(rows, model.key(rows), v_pred, paths)
    log_path = torch.where(paths >= 0, probs.log(), torch.zeros_like(probs)).sum(1)
    torch.testing.assert_close(log_path.view(3, 2), decoded["beam_scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps.sum(-1), torch.ones(6, 3))


def test_one_optimizer_step_lowers_the_loss() -> None:
    model, batch = make_model(), make_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = model.loss(model(batch["images"]), batch)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after = model.loss(model(batch["images"]), batch)
    assert after.item() < before.item()
    # The LSTM and the head are trained through the loss (they are not in the forward).
    assert model.cell.weight_ih.grad is not None and model.cell.weight_ih.grad.abs().sum() > 0
    assert model.head[0].weight.grad.abs().sum() > 0


def test_teacher_forcing_feeds_the_best_scored_positive_not_chosen() -> None:
    model, batch = make_model(), make_batch()
    outputs = model(batch["images"])
    step_logits, pools = model.unroll(outputs["features"], outputs["v_logits"], batch["labels"])
    assert step_logits.shape == (3, 3, C) and pools.shape == (3, 3, C)
    assert not pools[:, 0].any()
    positive = batch["labels"] > 0
    for b in range(3):
        for t in range(1, 3):
            fed = pools[b, t] & ~pools[b, t - 1]
            candidates = positive[b] & ~pools[b, t - 1]
            if not candidates.any():
                assert not fed.any()  # nothing left to feed
                continue
            assert int(fed.sum()) == 1
            best = step_logits[b, t - 1].masked_fill(~candidates, -float("inf")).argmax()
            assert bool(fed[best])
    # Image 1 has no positive: nothing is ever fed; image 0's -1 label is never fed.
    assert not pools[1].any() and not pools[0, :, 5].any()


def test_minus_one_labels_are_ignored_by_the_loss() -> None:
    model, batch = make_model(), make_batch()
    outputs = model(batch["images"])
    loss = model.loss(outputs, batch)
    for value in (0.0, 1.0):
        changed = dict(batch, labels=batch["labels"].clone())
        changed["labels"][0, 5] = value
        assert not torch.allclose(model.loss(outputs, changed), loss)
    # Whatever the image's other logits, the ignored entry's own logit has no gradient.
    model.zero_grad()
    v_logits = outputs["v_logits"].detach().requires_grad_(True)
    model.loss({"v_logits": v_logits, "features": outputs["features"]}, batch).backward()
    assert v_logits.grad[0, 5] == 0 and v_logits.grad[0, 4] != 0


def test_state_dict_round_trip_gives_the_same_outputs() -> None:
    model, batch = make_model(seed=0).eval(), make_batch()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = make_model(seed=5).eval()
    with torch.no_grad():
        assert not torch.equal(
            other(batch["images"])["v_logits"], model(batch["images"])["v_logits"]
        )
        other.load_state_dict(torch.load(buffer, weights_only=True))
        expected, got = model(batch["images"]), other(batch["images"])
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_reference_ops_give_the_same_forward_and_loss() -> None:
    model, batch = make_model().eval(), make_batch()
    # Eval first: a training-mode forward updates BatchNorm's running statistics.
    with torch.no_grad():
        fast = model(batch["images"])
        with mlkernels.reference.replacing_ops():
            slow = model(batch["images"])
    assert torch.equal(fast["labels"], slow["labels"])
    for key in ("v_logits", "beam_scores", "label_probs"):
        torch.testing.assert_close(slow[key], fast[key], rtol=1e-5, atol=1e-6)
    model.train()
    loss = model.loss(model(batch["images"]), batch)
    with mlkernels.reference.replacing_ops():
        reference_loss = model.loss(model(batch["images"]), batch)
    torch.testing.assert_close(reference_loss, loss, rtol=1e-5, atol=1e-6)


def test_torch_compile_forward_works() -> None:
    """backend "eager" (dynamo's graph capture and guards, no code generation: fast)."""
    model, batch = make_model(), make_batch()
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(
        compiled(batch["images"])["v_logits"], model(batch["images"])["v_logits"]
    )
    model.eval()
    with torch.no_grad():
        got, expected = compiled(batch["images"]), model(batch["images"])
    assert torch.equal(got["labels"], expected["labels"])
    torch.testing.assert_close(got["label_probs"], expected["label_probs"])


def test_registered_with_the_trainer_and_its_options() -> None:
    entry = get_model("order_free_rnn")
    assert entry.builder is build_order_free_rnn
    parser = argparse.ArgumentParser()
    entry.add_arguments(parser)
    args = parser.parse_args(
        [
            "--hidden-size",
            "8",
            "--feature-size",
            "8",
            "--head-size",
            "8",
            "--max-labels",
            "4",
            "--beam-size",
            "3",
            "--no-detach-v-pred",
        ]
    )
    model = build_model("order_free_rnn", C, build_backbone("small_cnn", pretrained=False), args)
    assert isinstance(model, OrderFreeRNN)
    assert (model.max_length, model.beam_size, model.detach_v_pred) == (4, 3, False)
    assert model.cell.hidden_size == 8 and model.threshold == 0.25


def test_save_attention_maps_writes_a_png(tmp_path) -> None:
    model, batch = make_model(threshold=0.0), make_batch()
    path = tmp_path / "maps" / "attention.png"
    labels = save_attention_maps(model, batch["images"][0], path, [f"c{i}" for i in range(C)])
    assert model.training  # the mode is restored
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(labels) == 3 and len(set(labels)) == 3  # threshold 0: a full path of T labels
    with pytest.raises(ValueError, match="save_attention_maps: image must be Tensor"):
        save_attention_maps(model, batch["images"], path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "num_classes must be an int >= 1, got 0"),
        ({"hidden_size": 0}, "hidden_size must be an int >= 1, got 0"),
        ({"max_length": 2.5}, "max_length must be an int >= 1, got 2.5"),
        ({"beam_size": -1}, "beam_size must be an int >= 1, got -1"),
        ({"threshold": 1.5}, r"threshold must be in \[0, 1\], got 1.5"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_constructor_arguments_give_clear_errors(kwargs: dict, message: str) -> None:
    settings = {"num_classes": C, "backbone": build_backbone("small_cnn", pretrained=False)}
    settings.update(kwargs)
    with pytest.raises(ValueError, match=f"OrderFreeRNN: {message}"):
        OrderFreeRNN(settings.pop("num_classes"), settings.pop("backbone"), **settings)
    with pytest.raises(TypeError, match="OrderFreeRNN: backbone must be an nn.Module"):
        OrderFreeRNN(C, torch.nn.Linear(2, 2))


def test_bad_inputs_give_clear_errors() -> None:
    model, batch = make_model(), make_batch()
    with pytest.raises(ValueError, match=r"OrderFreeRNN: images must be Tensor\[B, 3, H, W\]"):
        model(batch["images"][0])
    outputs = model(batch["images"])
    with pytest.raises(ValueError, match=r"OrderFreeRNN.loss: labels must be Tensor\[B, C\]"):
        model.loss(outputs, {"labels": batch["labels"][:, :3]})
    model.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="needs the training-mode outputs"):
        model.loss(model(batch["images"]), batch)


def test_score_sources_rank_the_classifier_the_decoder_or_both() -> None:
    images = make_batch()["images"]
    outputs = {}
    for source in ("mean", "classifier", "decoder"):
        model = make_model(score_source=source).eval()
        with torch.no_grad():
            outputs[source] = model.scores(model(images))
    v_prob, q = outputs["classifier"], outputs["decoder"]
    torch.testing.assert_close(outputs["mean"], (v_prob + q) / 2)
    assert not torch.equal(v_prob, q)
    with pytest.raises(ValueError, match="score_source"):
        make_model(score_source="both")
