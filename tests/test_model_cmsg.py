"""CMSG (models/cmsg.py) and the label-name embeddings (models/label_embeddings.py).

Fast: the small_cnn backbone, 48-pixel images, batches of 3, a precomputed similarity matrix
(the sentence-embedding model is replaced by a stub except in one test of the cache).
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch

import mlkernels
import mlkernels.reference
from models import label_embeddings as le
from models.backbones import build_backbone
from models.cmsg import CMSG, asymmetric_loss, class_names_of, correlation_graph
from models.registry import build_model, get_model

C, SIZE = 6, 48


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these models are tiny, and on a loaded 2-core machine two OpenMP
    threads spin-waiting for each other made small_cnn 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _similarity(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(C, C, generator=g) * 0.8
    s = (s + s.T) / 2
    return s.fill_diagonal_(1.0)


def _model(seed: int = 0, **kwargs) -> CMSG:
    torch.manual_seed(seed)
    options = dict(
        similarity=_similarity(),
        label_embeddings=torch.randn(C, 16, generator=torch.Generator().manual_seed(1)),
        dim=32,
        heads=4,
        layers=2,
        tau=0.4,
        p=0.2,
        dropout=0.0,
    )
    options.update(kwargs)
    return CMSG(C, build_backbone("small_cnn", pretrained=False), **options)


def _batch(batch: int = 3) -> dict:
    g = torch.Generator().manual_seed(2)
    labels = (torch.rand(batch, C, generator=g) < 0.4).float()
    labels[0, 1] = -1.0
    return {"images": torch.rand(batch, 3, SIZE, SIZE, generator=g), "labels": labels}


def test_output_shapes_and_scores() -> None:
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        logits = model(batch["images"])
    assert logits.shape == (3, C) and logits.dtype == torch.float32
    scores = model.scores(logits)
    assert scores.shape == (3, C) and bool(((scores >= 0) & (scores <= 1)).all())
    loss = model.loss(logits, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_correlation_graph_thresholds_and_reweights() -> None:
    tau, p = 0.5, 0.3
    s = torch.tensor(
        [
            [1.0, 0.5, 0.7, 0.1],  # two neighbours, one exactly at tau
            [0.5, 1.0, 0.4999, 0.2],  # one neighbour (0.4999 is below tau)
            [0.7, 0.4999, 1.0, 0.0],  # one neighbour
            [0.1, 0.2, 0.0, 1.0],  # none: only the diagonal
        ]
    )
    weights, attend = correlation_graph(s, tau, p)
    edges = (s >= tau) & ~torch.eye(4, dtype=torch.bool)
    assert torch.equal(attend, edges | torch.eye(4, dtype=torch.bool))
    assert bool(attend.diagonal().all())
    for i in range(4):
        neighbours = int(edges[i].sum())
        for j in range(4):
            if i == j:
                expected = 1 - p
            else:
                expected = p / neighbours if edges[i, j] else 0.0
            assert math.isclose(float(weights[i, j]), expected, rel_tol=1e-6, abs_tol=1e-7)
    torch.testing.assert_close(weights[:3].sum(1), torch.ones(3))
    with pytest.raises(ValueError, match=r"correlation_graph: p must be in \[0, 1\)"):
        correlation_graph(s, tau, 1.0)
    with pytest.raises(ValueError, match="correlation_graph: similarity must be Tensor"):
        correlation_graph(s[:3], tau, p)


def test_model_mask_and_bias_come_from_the_graph() -> None:
    model = _model()
    weights, attend = correlation_graph(_similarity(), 0.4, 0.2)
    assert torch.equal(model.attend, attend)
    for layer in model.layers:
        torch.testing.assert_close(layer.sga.bias.detach(), weights)
        mask = layer.sga.masked_bias(model.attend, torch.float32)
        assert bool(torch.isneginf(mask[~attend]).all())
        torch.testing.assert_close(mask[attend], weights[attend])
    free = _model(similarity=None)
    assert bool(free.attend.all()) and not free.layers[0].sga.bias.detach().any()
    frozen = _model(freeze_bias=True)
    assert not any(layer.sga.bias.requires_grad for layer in frozen.layers)


def test_one_step_lowers_the_loss() -> None:
    model = _model()
    model.train()
    batch = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss = model.loss(model(batch["images"]), batch)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        assert model.layers[0].sga.bias.grad is not None
        assert model.layers[0].sga.bias.grad.abs().sum() > 0
        optimizer.step()
    assert losses[1] < losses[0]


def test_state_dict_round_trip() -> None:
    model = _model(seed=0).eval()
    # Another init, and the placeholder a builder makes without class names (zero embeddings,
    # diagonal-only graph): loading the state dict restores everything, buffers included.
    other = _model(seed=5, similarity=torch.eye(C), label_embeddings=torch.zeros(C, 16)).eval()
    images = _batch()["images"]
    with torch.no_grad():
        expected = model(images)
        assert not torch.allclose(other(images), expected)
        other.load_state_dict(copy.deepcopy(model.state_dict()))
        assert torch.equal(other.attend, model.attend)
        torch.testing.assert_close(other(images), expected, rtol=0, atol=0)


def test_reference_ops_give_the_same_forward_and_bias_gradient() -> None:
    model = _model().eval()
    batch = _batch()
    fast = model(batch["images"])
    model.loss(fast, batch).backward()
    fast_grad = model.layers[0].sga.bias.grad.clone()
    model.zero_grad()
    with mlkernels.reference.replacing_ops():
        slow = model(batch["images"])
        model.loss(slow, batch).backward()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_grad, model.layers[0].sga.bias.grad, rtol=1e-3, atol=1e-6)


def test_torch_compile_aot_eager_forward() -> None:
    model = _model().eval()
    images = _batch()["images"]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_trains() -> None:
    """The trainer's --amp bf16: forward and backward run, the bias gets a gradient."""
    model = _model()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch["images"])
        loss = model.loss(logits, batch)
    loss.backward()
    assert logits.shape == (3, C) and torch.isfinite(loss)
    grad = model.layers[0].sga.bias.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0


def test_ignored_labels_leave_the_loss_alone() -> None:
    model = _model().eval()
    batch = _batch()
    logits = model(batch["images"]).detach().requires_grad_(True)
    loss = model.loss(logits, batch)
    loss.backward()
    assert logits.grad[0, 1] == 0  # the -1 label
    changed = {**batch, "labels": batch["labels"].clone()}
    shifted = logits.detach().clone()
    shifted[0, 1] += 5.0
    torch.testing.assert_close(model.loss(shifted, changed), loss.detach())
    everything_ignored = torch.full_like(batch["labels"], -1.0)
    assert model.loss(logits, {"labels": everything_ignored}).item() == 0.0


def test_asymmetric_loss_matches_its_formula() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, generator=g) * 3
    labels = (torch.rand(4, 5, generator=g) < 0.5).float()
    labels[1, 2] = -1
    gamma_neg, gamma_pos, clip = 4.0, 1.0, 0.05
    total, count = 0.0, 0
    for x, y in zip(logits.flatten().tolist(), labels.flatten().tolist(), strict=True):
        if y < 0:
            continue
        p = 1 / (1 + math.exp(-x))
        if y > 0:
            total += -((1 - p) ** gamma_pos) * math.log(p)
        else:
            pm = max(p - clip, 0.0)
            total += -(pm**gamma_neg) * math.log(1 - pm)
        count += 1
    got = asymmetric_loss(logits, labels, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    assert math.isclose(got.item(), total / count, rel_tol=1e-5)
    # gamma 0 and clip 0: plain binary cross-entropy.
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.clamp(min=0))
    mask = labels >= 0
    plain = asymmetric_loss(
        logits[mask][None], labels[mask][None], gamma_neg=0, gamma_pos=0, clip=0
    )
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], labels[mask])
    torch.testing.assert_close(plain, expected)
    assert bce.item() != plain.item()  # the -1 label was left out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "CMSG: num_classes must be an int >= 1, got 0"),
        ({"dim": 30}, "CMSG: dim must be a positive multiple of 4 and of heads"),
        ({"dim": 32, "heads": 5}, "heads=5"),
        ({"layers": 0}, "CMSG: layers must be >= 1, got 0"),
        ({"p": 1.0}, r"CMSG: p must be in \[0, 1\), got 1.0"),
        ({"tau": 2.0}, r"CMSG: tau must be in \[-1, 1\]"),
        ({"dropout": 1.0}, r"CMSG: dropout must be in \[0, 1\)"),
        ({"clip": -0.1}, "clip=-0.1"),
        ({"similarity": torch.eye(C + 1)}, r"CMSG: similarity must be Tensor\[6, 6\]"),
        ({"label_embeddings": torch.zeros(C - 1, 4)}, r"label_embeddings must be Tensor\[6, E\]"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, message: str) -> None:
    kwargs = dict(kwargs)
    num_classes = kwargs.pop("num_classes", C)
    options = {"dim": 32, "heads": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        CMSG(num_classes, build_backbone("small_cnn", pretrained=False), **options)
    with pytest.raises(ValueError, match="CMSG: backbone must be a models.backbones backbone"):
        CMSG(C, torch.nn.Identity())


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    get_model("cmsg").add_arguments(parser)
    args = parser.parse_args(["--cmsg-dim", "32", "--cmsg-heads", "4", "--cmsg-layers", "1"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _stub_embeddings(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake(names, cache_dir=None):
        calls.append(list(names))
        g = torch.Generator().manual_seed(len(names))
        return torch.nn.functional.normalize(torch.randn(len(names), le.EMBEDDING_DIM, generator=g))

    monkeypatch.setattr(le, "label_name_embeddings", fake)
    return calls


def test_registered_builder_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stub_embeddings(monkeypatch)
    names = [f"class {i}" for i in range(C)]
    args = _args(class_names=names, cmsg_tau=0.0)
    assert (args.cmsg_gamma_neg, args.cmsg_gamma_pos, args.cmsg_clip) == (4.0, 1.0, 0.05)
    model = build_model("cmsg", C, build_backbone("small_cnn", pretrained=False), args)
    assert isinstance(model, CMSG) and calls == [names]
    assert model.label_embeddings.shape == (C, le.EMBEDDING_DIM) and len(model.layers) == 1
    expected = le.cosine_similarity_matrix(model.label_embeddings)
    torch.testing.assert_close(model.similarity, expected)
    assert torch.equal(model.attend, correlation_graph(expected, 0.0, args.cmsg_p)[1])
    ablation = _args(class_names=names, cmsg_correlation="none", cmsg_label_embeddings=False)
    plain = build_model("cmsg", C, build_backbone("small_cnn", pretrained=False), ablation)
    assert plain.label_embeddings is None and plain.embed_names is None and plain.attend.all()
    # The scenes benchmark's names come without opening it.
    assert class_names_of(argparse.Namespace(data="scenes"), 27) is not None
    assert class_names_of(argparse.Namespace(data="scenes"), 26) is None


def test_builder_without_class_names_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stub_embeddings(monkeypatch)
    args = _args(data="voc2007:/nonexistent/path")
    with pytest.warns(UserWarning, match="build_cmsg: the 6 class names .* are unknown"):
        model = build_model("cmsg", C, build_backbone("small_cnn", pretrained=False), args)
    assert calls == [] and not model.label_embeddings.any()
    assert torch.equal(model.attend, torch.eye(C, dtype=torch.bool))


def test_label_embeddings_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    encoded: list[list[str]] = []

    def fake_encode(texts):
        encoded.append(list(texts))
        g = torch.Generator().manual_seed(7)
        return torch.nn.functional.normalize(torch.randn(len(texts), le.EMBEDDING_DIM, generator=g))

    monkeypatch.setattr(le, "_encode", fake_encode)
    first = le.label_name_embeddings(["potted_plant", "cat"], cache_dir=tmp_path)
    again = le.label_name_embeddings(["potted_plant", "cat"], cache_dir=tmp_path)
    assert encoded == [["potted plant", "cat"]] and torch.equal(first, again)
    le.label_name_embeddings(["cat", "potted_plant"], cache_dir=tmp_path)  # another order
    assert len(encoded) == 2
    next(tmp_path.glob("*.pt")).write_bytes(b"truncated")  # a corrupt file is recomputed
    le.label_name_embeddings(["potted_plant", "cat"], cache_dir=tmp_path)
    le.label_name_embeddings(["cat", "potted_plant"], cache_dir=tmp_path)
    assert len(encoded) == 3
    with pytest.raises(ValueError, match="label_name_embeddings: names must be a non-empty"):
        le.label_name_embeddings([], cache_dir=tmp_path)
    sim = le.cosine_similarity_matrix(first)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(2))


def test_packaged_sentence_model_offline(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real model (about 6 s to load): unit vectors, digits closer to each other than to a
    cat, and the second call served from the cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = ["one", "two", "cat"]
    embeddings = le.label_name_embeddings(names, cache_dir=tmp_path)
    assert embeddings.shape == (3, le.EMBEDDING_DIM) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    sim = le.cosine_similarity_matrix(embeddings)
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]
    monkeypatch.setattr(le, "_encode", lambda texts: pytest.fail("the cache was not used"))
    torch.testing.assert_close(le.label_name_embeddings(names, cache_dir=tmp_path), embeddings)
