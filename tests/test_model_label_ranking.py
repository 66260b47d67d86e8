"""The label-ranking model (models/label_ranking.py): shapes, training step, save/load, reference
ops, torch.compile, the hinge rank loss, the word-vector reader, zero-shot ranking and bad
arguments. small_cnn backbone, 32-64 px images, random label vectors or a tiny vector file."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import sgd_step_losses

import mlkernels
from models.backbones import build_backbone
from models.label_ranking import (
    LabelRanking,
    add_arguments,
    class_words,
    rank_hinge_loss,
    read_label_vectors,
)
from models.registry import build_model, model_names

NUM_CLASSES = 5
DIM = 6
NAMES = ["cat", "dog", "potted_plant", "traffic light", "Sofa"]
VECTOR_FILE = """\
9 6
cat 1 0 0 0 0 0
dog 0 1 0 0 0 0
potted 0 0 1 0 0 0
plant 0 0 0 1 0 0
traffic 0 0 0 0 1 0
light 0 0 0 0 0 1
Sofa 1 1 0 0 0 0
boat 0 0 1 1 1 1
the 0.5 0.5 0.5 0.5 0.5 0.5
"""


def random_vectors(seed: int = 5, classes: int = NUM_CLASSES) -> torch.Tensor:
    return torch.randn(classes, DIM, generator=torch.Generator().manual_seed(seed))


def make_model(seed: int = 0, **options) -> LabelRanking:
    torch.manual_seed(seed)
    backbone = build_backbone("small_cnn", pretrained=False)
    options = {"rank_dim": 8, **options}
    return LabelRanking(NUM_CLASSES, backbone, random_vectors(), **options)


def tiny_batch(size: int = 48, batch: int = 4, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    labels = torch.tensor(
        [[1, 0, 0, 1, 0], [0, 1, 1, 0, -1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.float32
    )[:batch]
    return {"images": images, "labels": labels}


@pytest.fixture
def vector_file(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text(VECTOR_FILE, encoding="utf-8")
    return path


@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes(size):
    model = make_model().eval()
    images = tiny_batch(size, batch=3)["images"]
    with torch.no_grad():
        outputs = model(images)
    assert outputs["transform"].shape == (3, 8, DIM)
    assert outputs["ranking"].shape == (3, NUM_CLASSES)
    assert outputs["ranking"].dtype == torch.float32
    # s = ||A w||^2 with w the unit-length label vectors
    unit = random_vectors() / random_vectors().norm(dim=1, keepdim=True)
    expected = (outputs["transform"] @ unit.T).square().sum(dim=1)
    torch.testing.assert_close(outputs["ranking"], expected, rtol=1e-5, atol=1e-6)
    scores = model.scores(outputs)
    assert scores.shape == (3, NUM_CLASSES) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert model.loss(outputs, {"labels": tiny_batch(batch=3)["labels"]}).dim() == 0


def test_norm_score_is_the_root_of_the_squared_score():
    images = tiny_batch(size=32, batch=2)["images"]
    with torch.no_grad():
        squared = make_model().eval()(images)["ranking"]
        norm = make_model(score="norm").eval()(images)["ranking"]
    torch.testing.assert_close(norm, (squared + 1e-8).sqrt())


def test_scores_are_a_monotone_map_of_the_ranking():
    model = make_model(margin=2.0)
    ranking = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    scores = model.scores({"ranking": ranking})
    assert bool((scores.diff(dim=1) > 0).all())
    torch.testing.assert_close(scores[0, 1], torch.tensor(0.5))  # s = m / 2


def test_one_optimizer_step_lowers_the_loss():
    # seed: the same sampled negatives both times (here all of them: 5 classes < 40)
    before, after = sgd_step_losses(make_model(), tiny_batch(), seed=3)
    assert before > 0
    assert after < before


def test_label_vectors_are_a_fixed_buffer():
    model = make_model()
    assert "label_vectors" in dict(model.named_buffers())
    assert "label_vectors" not in dict(model.named_parameters())


def test_state_dict_round_trip_gives_the_same_outputs(tmp_path):
    model = make_model(seed=0).eval()
    path = tmp_path / "label_ranking.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    other = LabelRanking(
        NUM_CLASSES, build_backbone("small_cnn", pretrained=False), random_vectors(9), rank_dim=8
    ).eval()
    images = tiny_batch()["images"]
    with torch.no_grad():
        expected = model(images)
        assert not torch.allclose(other(images)["ranking"], expected["ranking"])
        other.load_state_dict(torch.load(path, weights_only=True))
        got = other(images)
    torch.testing.assert_close(other.label_vectors, model.label_vectors, rtol=0, atol=0)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_reference_ops_change_nothing():
    # The model (and small_cnn) call no mlkernels op: the swap must leave everything as it was.
    model = make_model().eval()
    batch = tiny_batch()
    torch.manual_seed(0)
    fast = model(batch["images"])
    model.loss(fast, batch).backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with mlkernels.reference.replacing_ops():
        torch.manual_seed(0)
        slow = model(batch["images"])
        model.loss(slow, batch).backward()
    for key in fast:
        torch.testing.assert_close(slow[key], fast[key], rtol=0, atol=0)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, fast_grads[name], rtol=0, atol=0)


def test_torch_compile_forward_matches_eager():
    torch._dynamo.reset()
    model = make_model().eval()
    images = tiny_batch(size=32)["images"]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(images)
        got = compiled(images)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_ignored_labels_get_zero_gradient():
    model = make_model()
    batch = tiny_batch()
    ranking = model(batch["images"])["ranking"].detach().requires_grad_(True)
    loss = model.loss({"ranking": ranking}, batch)
    loss.backward()
    ignored = batch["labels"] == -1
    assert bool(ignored.any()) and loss.item() > 0
    assert bool((ranking.grad[ignored] == 0).all())
    # The ignored entries' values do not matter.
    changed = ranking.detach().clone()
    changed[ignored] = 1e4
    torch.testing.assert_close(model.loss({"ranking": changed}, batch), loss.detach())
    everything_ignored = {"labels": torch.full_like(batch["labels"], -1.0)}
    assert model.loss({"ranking": ranking}, everything_ignored).item() == 0.0


def test_hinge_loss_of_a_hand_built_case():
    ranking = torch.tensor(
        [
            [3.0, 1.0, 2.5, 0.0],  # positives 0, 1: mean 2; negative 2.5 (index 3 ignored)
            [0.5, 4.0, 0.0, 2.0],  # positive 1 (4); negatives 0.5, 0, 2: all beyond the margin
            [1.0, 2.0, 3.0, 4.0],  # no positive: contributes 0
            [5.0, 1.0, 1.0, 1.0],  # positive 0, no negative: contributes 0
        ]
    )
    labels = torch.tensor(
        [[1.0, 1.0, 0.0, -1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -1, -1, -1]]
    )
    # Image 0, "mean": max(0, 1 - 2 + 2.5) = 1.5; "each": 3 vs 2.5 gives 0.5 and 1 vs 2.5 gives
    # 2.5, mean 1.5. Image 1: max(0, 1 - 4 + {0.5, 0, 2}) = 0 either way. Mean of the two: 0.75.
    # A margin of 3: image 0 gives 3 - 2 + 2.5 = 3.5 (or (2.5 + 4.5) / 2), image 1 (0 + 0 + 1) / 3.
    for pairing in ("each", "mean"):  # every pair active: the two pairings agree here
        loss = rank_hinge_loss(ranking, labels, margin=1.0, negatives=40, pairing=pairing)
        torch.testing.assert_close(loss, torch.tensor(0.75))
        loss = rank_hinge_loss(ranking, labels, margin=3.0, pairing=pairing)
        torch.testing.assert_close(loss, torch.tensor((3.5 + 1 / 3) / 2))
    # Where they differ: positives 5 and 0.5, negative 1. The mean (2.75) beats 1 by the margin,
    # but 0.5 does not beat 1: "each" pays max(0, 1 - 5 + 1) = 0 and max(0, 1 - 0.5 + 1) = 1.5.
    ranking_2 = torch.tensor([[5.0, 0.5, 1.0]])
    labels_2 = torch.tensor([[1.0, 1.0, 0.0]])
    assert rank_hinge_loss(ranking_2, labels_2, pairing="mean").item() == 0.0
    torch.testing.assert_close(rank_hinge_loss(ranking_2, labels_2), torch.tensor(0.75))
    no_pairs = rank_hinge_loss(ranking.requires_grad_(True), labels[2:3].expand(4, 4))
    assert no_pairs.item() == 0.0 and no_pairs.requires_grad


def test_hinge_loss_samples_the_negatives_without_replacement():
    # One positive (score 2) and three negatives with scores 1.5, 2, 3 (hinges 0.5, 1, 2).
    ranking = torch.tensor([[2.0, 1.5, 2.0, 3.0, 100.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0, -1.0]])
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        seen.add(round(rank_hinge_loss(ranking, labels, negatives=1).item(), 4))
    assert seen == {0.5, 1.0, 2.0}  # one negative each time, never the ignored label
    pairs = set()
    for seed in range(40):
        torch.manual_seed(seed)
        pairs.add(round(rank_hinge_loss(ranking, labels, negatives=2).item(), 4))
    assert pairs == {0.75, 1.25, 1.5}  # two different negatives each time
    torch.manual_seed(0)
    assert rank_hinge_loss(ranking, labels, negatives=3).item() == pytest.approx(3.5 / 3)


def test_class_words_and_the_vector_file_reader(vector_file, tmp_path):
    assert class_words("potted_plant") == ["potted", "plant"]
    assert class_words(" traffic  light ") == ["traffic", "light"]
    assert class_words("t-shirt") == ["t", "shirt"]
    vectors = read_label_vectors(vector_file, NAMES)  # the "9 6" header is skipped
    assert vectors.shape == (NUM_CLASSES, DIM) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors[0], torch.tensor([1.0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(vectors[2], torch.tensor([0, 0, 0.5, 0.5, 0, 0]))
    torch.testing.assert_close(vectors[3], torch.tensor([0, 0, 0, 0, 0.5, 0.5]))
    # A word is looked up as written, then in lower case: the file's "Sofa" is found for the
    # class "Sofa" but not for "sofa".
    with pytest.raises(ValueError, match="class 'sofa': the word 'sofa' is not in"):
        read_label_vectors(vector_file, ["sofa"])
    torch.testing.assert_close(
        read_label_vectors(vector_file, ["Sofa"])[0], torch.tensor([1.0, 1, 0, 0, 0, 0])
    )
    with pytest.raises(ValueError, match="class 'potted_cactus': the word 'cactus' is not in"):
        read_label_vectors(vector_file, ["cat", "potted_cactus"])
    # Without a header, GloVe style; a class word in upper case finds the lower-case file word.
    glove = tmp_path / "glove.txt"
    glove.write_text("cat 1 2\ndog 3 4\n", encoding="utf-8")
    torch.testing.assert_close(read_label_vectors(glove, ["Dog_cat"]), torch.tensor([[2.0, 3.0]]))
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("cat 1 2\ndog 3 4 5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="ragged.txt:2: the vector of 'dog' has 3 values"):
        read_label_vectors(ragged, ["cat"])
    with pytest.raises(OSError):
        read_label_vectors(tmp_path / "missing.txt", ["cat"])


def test_zero_shot_rank_of_unseen_names(vector_file):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--rank-dim", "4", "--label-vectors", str(vector_file)])
    args.class_names = ["cat", "dog", "potted_plant", "traffic_light"]
    torch.manual_seed(0)
    model = build_model("label_ranking", 4, build_backbone("small_cnn", pretrained=False), args)
    model.eval()
    images = tiny_batch(size=32, batch=3)["images"]
    unseen = model.label_vectors_for(["boat", "the", "Sofa"])  # not in training
    assert unseen.shape == (3, DIM)
    with torch.no_grad():
        ranking = model.rank(images, unseen)
        outputs = model(images)
        seen = model.rank(images, model.label_vectors_for(args.class_names))
    assert ranking.shape == (3, 3) and ranking.dtype == torch.float32
    assert bool((ranking >= 0).all())
    # A seen label through rank: the model's own ranking score, so the same order as its scores.
    torch.testing.assert_close(seen, outputs["ranking"])
    order = model.scores(outputs).argsort(dim=1, descending=True)
    assert torch.equal(seen.argsort(dim=1, descending=True), order)
    # The same vector rescaled ranks the same (unit length inside).
    with torch.no_grad():
        torch.testing.assert_close(model.rank(images, 7 * unseen), ranking)
    with pytest.raises(
        ValueError, match=r"LabelRanking.rank: label_vectors must be Tensor\[C', 6\]"
    ):
        model.rank(images, torch.zeros(2, 5))


def test_registered_and_built_with_label_name_embeddings():
    # The one test that uses the MiniLM embeddings (cached on disk after the first run).
    from models.label_embeddings import EMBEDDING_DIM, label_name_embeddings

    assert "label_ranking" in model_names()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--rank-dim", "3"])
    assert args.rank_margin == 1.0 and args.rank_negatives == 40 and args.label_vectors is None
    assert args.rank_pairing == "each" and args.rank_score == "squared"
    args.class_names = ["cat", "dog", "sofa"]
    model = build_model("label_ranking", 3, build_backbone("small_cnn", pretrained=False), args)
    assert isinstance(model, LabelRanking) and model.vector_source is None
    torch.testing.assert_close(model.label_vectors, label_name_embeddings(args.class_names))
    assert model.label_vectors_for(["boat"]).shape == (1, EMBEDDING_DIM)
    with torch.no_grad():
        outputs = model.eval()(torch.rand(2, 3, 32, 32))
        unseen = model.rank(torch.rand(2, 3, 32, 32), model.label_vectors_for(["boat", "tree"]))
    assert outputs["transform"].shape == (2, 3, EMBEDDING_DIM)
    assert unseen.shape == (2, 2)


def test_builder_without_class_names_warns_and_starts_at_zero(vector_file):
    args = argparse.Namespace(data="", label_vectors=str(vector_file), rank_dim=2)
    with pytest.warns(UserWarning, match="class names of --data '' are unknown"):
        model = build_model("label_ranking", 3, build_backbone("small_cnn", pretrained=False), args)
    assert model.label_vectors.shape == (3, DIM) and not model.label_vectors.any()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank_dim": 0}, "LabelRanking: rank_dim must be >= 1, got 0"),
        ({"margin": 0.0}, "LabelRanking: margin must be > 0, got 0.0"),
        ({"margin": -1.0}, "LabelRanking: margin must be > 0, got -1.0"),
        ({"negatives": 0}, "LabelRanking: negatives must be >= 1, got 0"),
        ({"pairing": "all"}, "LabelRanking: pairing must be one of .*, got 'all'"),
        ({"score": "log"}, "LabelRanking: score must be one of .*, got 'log'"),
    ],
)
def test_bad_constructor_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        make_model(**options)


def test_bad_num_classes_label_vectors_and_backbone(vector_file, tmp_path):
    backbone = build_backbone("small_cnn", pretrained=False)
    with pytest.raises(ValueError, match="LabelRanking: num_classes must be >= 1, got 0"):
        LabelRanking(0, backbone, torch.zeros(0, DIM))
    with pytest.raises(
        ValueError, match=r"LabelRanking: label_vectors must be a float Tensor\[3, d\], got"
    ):
        LabelRanking(3, backbone, torch.zeros(4, DIM))
    with pytest.raises(TypeError, match="LabelRanking: backbone must be an nn.Module with an int"):
        LabelRanking(3, torch.nn.Conv2d(3, 8, 3), torch.zeros(3, DIM))
    with pytest.raises(ValueError, match="rank_hinge_loss: margin must be > 0"):
        rank_hinge_loss(torch.zeros(2, 3), torch.zeros(2, 3), margin=0.0)
    with pytest.raises(ValueError, match="rank_hinge_loss: negatives must be >= 1"):
        rank_hinge_loss(torch.zeros(2, 3), torch.zeros(2, 3), negatives=0)
    with pytest.raises(ValueError, match="rank_hinge_loss: pairing must be one of"):
        rank_hinge_loss(torch.zeros(2, 3), torch.zeros(2, 3), pairing="max")
    with pytest.raises(ValueError, match="rank_hinge_loss: ranking and labels must be"):
        rank_hinge_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    args = argparse.Namespace(class_names=["cat", "zebra"], label_vectors=str(vector_file))
    with pytest.raises(ValueError, match="--label-vectors: .*class 'zebra': the word 'zebra'"):
        build_model("label_ranking", 2, backbone, args)
    args.label_vectors = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="--label-vectors: cannot read .*missing.txt"):
        build_model("label_ranking", 2, backbone, args)


def test_trains_from_the_cli_with_a_vector_file_and_ranks_any_names(tmp_path, capsys):
    from PIL import Image

    from models import label_ranking
    from models.data.scenes import scene_classes
    from models.train import main

    words = sorted({w for name in scene_classes() for w in class_words(name)} | {"boat"})
    generator = torch.Generator().manual_seed(0)
    lines = [f"{len(words)} 4"] + [
        f"{w} " + " ".join(f"{v:.4f}" for v in torch.randn(4, generator=generator).tolist())
        for w in words
    ]
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    argv = [
        "--model", "label_ranking", "--rank-dim", "4", "--label-vectors", str(vectors),
        "--data", f"scenes:{tmp_path / 'scenes'}", "--data-option", "num_images=(16, 8, 8)",
        "--data-option", "image_size=48", "--data-option", "progress=False",
        "--backbone", "small_cnn", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
        "--image-size", "32", "--threads", "1", "--no-progress", "--no-report", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    image = tmp_path / "image.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()).save(image)
    capsys.readouterr()
    checkpoint = str(out / "best.pt")
    assert label_ranking.main(["--checkpoint", checkpoint, str(image), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.count(",") == 1  # two trained classes with their scores
    assert label_ranking.main(["--checkpoint", checkpoint, str(image), "--labels", "boat"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: boat ")
    assert label_ranking.main(["--checkpoint", checkpoint, str(image), "--labels", "zebra"]) == 2
    assert "the word 'zebra' is not in" in capsys.readouterr().err
