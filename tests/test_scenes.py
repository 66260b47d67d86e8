"""The scenes benchmark (models.data.scenes): sample format, determinism, the statistics the
benchmark promises (object counts, small objects, class co-occurrence), the cache and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models.data import SPLITS, open_dataset, scenes
from models.data.scenes import (
    SCENE_TYPES,
    ScenesDataset,
    default_root,
    generate_scenes,
    scene_classes,
)

SIZE = 128
COUNTS = (300, 20, 20)  # a few hundred images for the statistics, still ~1 s to generate


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("scenes")


@pytest.fixture(scope="module")
def train(root):
    return ScenesDataset(root, "train", num_images=COUNTS, progress=False)


def _split_arrays(folder, split):
    """Every array of a cached split: images and annotations."""
    arrays = {"images": np.load(folder / f"{split}_images.npy")}
    with np.load(folder / f"{split}_annotations.npz") as annotations:
        arrays.update({key: annotations[key] for key in annotations.files})
    return arrays


def test_sample_format(root, train):
    transformed = ScenesDataset(
        root,
        "val",
        num_images=COUNTS,
        progress=False,
        transform=lambda sample: {**sample, "seen": True},
    )
    assert transformed[3]["seen"] is True
    c = len(scene_classes())
    assert train.classes == scene_classes() and train.num_classes == c
    assert len(train) == COUNTS[0]
    assert train.labels.dtype == torch.float32 and train.labels.shape == (COUNTS[0], c)
    for i in (0, 1, len(train) - 1, -1):
        sample = train[i]
        assert set(sample) == {"image", "labels", "boxes", "box_classes", "index"}
        assert sample["index"] == i % len(train)
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, SIZE, SIZE)
        assert sample["labels"].dtype == torch.float32 and sample["labels"].shape == (c,)
        n = len(sample["box_classes"])
        assert sample["boxes"].dtype == torch.float32 and sample["boxes"].shape == (n, 4)
        assert sample["box_classes"].dtype == torch.int64
        assert torch.equal(sample["labels"], train.labels[i])
    objects = train.objects
    assert set(objects) == {"image", "class", "area_fraction"}
    m = len(objects["image"])
    assert objects["image"].dtype == torch.int64 and objects["class"].dtype == torch.int64
    assert objects["area_fraction"].dtype == torch.float32
    assert objects["class"].shape == objects["area_fraction"].shape == (m,)
    boxes = torch.cat([train[i]["boxes"] for i in range(len(train))])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / SIZE**2
    assert torch.allclose(objects["area_fraction"], area)


def test_classes_and_scene_types():
    classes = scene_classes()
    assert len(classes) >= 20 and len(set(classes)) == len(classes)
    assert all(name.isalpha() and name.islower() and len(name) <= 12 for name in classes)
    assert 5 <= len(SCENE_TYPES) <= 8
    for scene in SCENE_TYPES:
        assert set(scene.classes) <= set(classes)
        assert scene.backgrounds and scene.probability > 0
    # every class is a likely one of some scene type
    assert set().union(*(scene.classes for scene in SCENE_TYPES)) == set(classes)


def test_objects_labels_and_boxes(train):
    per_image = torch.bincount(train.objects["image"], minlength=len(train))
    assert per_image.min() >= 1 and per_image.max() <= 6
    assert len(set(per_image.tolist())) >= 4  # the counts vary
    for i in range(len(train)):
        sample = train[i]
        present = torch.zeros(train.num_classes)
        present[sample["box_classes"]] = 1
        assert torch.equal(sample["labels"], present), i
        boxes = sample["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= SIZE).all() and (boxes[:, 3] <= SIZE).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


@given(
    seed=st.integers(0, 2**32),
    split=st.sampled_from(SPLITS),
    index=st.integers(0, 10**6),
    size=st.integers(32, 160),
)
def test_any_scene_is_well_formed(seed, split, index, size):
    image, boxes, classes, scene = scenes._draw_scene(seed, split, index, size)
    assert image.dtype == np.uint8 and image.shape == (3, size, size)
    assert boxes.dtype == np.float32 and boxes.shape == (len(classes), 4)
    assert classes.dtype == np.int64 and 1 <= len(classes) <= 6
    assert ((classes >= 0) & (classes < len(scene_classes()))).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert 0 <= scene < len(SCENE_TYPES)
    again = scenes._draw_scene(seed, split, index, size)
    assert np.array_equal(again[0], image) and np.array_equal(again[1], boxes)


def test_object_sizes(train):
    area = train.objects["area_fraction"]
    assert len(area) >= 600
    assert (area < 0.01).float().mean() >= 1 / 3
    assert (area > 0.1).float().mean() >= 0.1  # and large ones too
    assert area.max() > 0.3


def test_images_are_not_blank(train):
    images = torch.stack([train[i]["image"] for i in range(50)]).float()
    assert images.std(dim=(1, 2, 3)).min() > 5  # textured backgrounds, not flat fills
    assert not torch.equal(images[0], images[1])


def test_classes_cooccur_by_scene_type(train):
    """Some class pairs occur together far more often than independence predicts, as the latent
    scene types make them; and each scene type has its own class frequencies."""
    labels = train.labels.double()
    n = len(labels)
    counts = labels.sum(0)
    together = labels.T @ labels
    expected = torch.outer(counts, counts) / n
    lift = together / expected.clamp_min(1e-9)
    lift.fill_diagonal_(0)
    frequent = together >= 10
    assert frequent.any()
    assert lift[frequent].max() > 3
    # Chi-square of the (scene type x class) table against independence: large.
    scene_types = train.scene_types
    table = torch.zeros(len(SCENE_TYPES), train.num_classes, dtype=torch.float64)
    table.index_add_(0, scene_types, labels)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected.clamp_min(1e-9)).sum()
    dof = (len(SCENE_TYPES) - 1) * (train.num_classes - 1)
    assert chi2 > 5 * dof


def test_deterministic_and_prefix(root, train, tmp_path):
    other = generate_scenes(tmp_path / "again", num_images=COUNTS, progress=False)
    smaller = generate_scenes(tmp_path / "small", num_images=(40, 5, 7), progress=False)
    assert other.name == train.folder.name and smaller.name != other.name
    for split, count in zip(SPLITS, (40, 5, 7), strict=True):
        full = _split_arrays(train.folder, split)
        again = _split_arrays(other, split)
        assert (other / f"{split}_images.npy").read_bytes() == (
            train.folder / f"{split}_images.npy"
        ).read_bytes()
        for key in full:
            assert np.array_equal(full[key], again[key]), (split, key)
        prefix = _split_arrays(smaller, split)
        m = int((full["box_image"] < count).sum())
        for key in ("images", "labels", "scene_types"):
            assert np.array_equal(prefix[key], full[key][:count]), (split, key)
        for key in ("boxes", "box_classes", "box_image"):
            assert np.array_equal(prefix[key], full[key][:m]), (split, key)
    # a different seed gives different images
    seed1 = generate_scenes(tmp_path / "small", seed=1, num_images=(40, 5, 7), progress=False)
    assert seed1 != smaller
    assert not np.array_equal(_split_arrays(seed1, "val")["images"], prefix["images"])


def test_cache_is_reused(root, train, monkeypatch):
    mtimes = {path.name: path.stat().st_mtime_ns for path in train.folder.iterdir()}

    def no_drawing(*args):
        raise AssertionError("the cached benchmark was generated again")

    monkeypatch.setattr(scenes, "_draw_scene", no_drawing)
    again = ScenesDataset(root, "test", num_images=COUNTS, progress=False)
    assert again.folder == train.folder and len(again) == COUNTS[2]
    assert {path.name: path.stat().st_mtime_ns for path in train.folder.iterdir()} == mtimes


def test_interrupted_generation_leaves_no_cache(tmp_path, monkeypatch):
    draw = scenes._draw_scene
    calls = []

    def failing(seed, split, index, size):
        calls.append(index)
        if split == "val" and index == 3:
            raise KeyboardInterrupt
        return draw(seed, split, index, size)

    monkeypatch.setattr(scenes, "_draw_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_scenes(tmp_path, num_images=(6, 6, 6), progress=False)
    (folder,) = tmp_path.iterdir()
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["train_annotations.npz", "train_images.npy"]  # no temporary, no meta.json
    monkeypatch.setattr(scenes, "_draw_scene", draw)
    dataset = ScenesDataset(tmp_path, "val", num_images=(6, 6, 6), progress=False)
    assert len(dataset) == 6 and (folder / "meta.json").exists()


@pytest.mark.parametrize("damaged", ["val_images.npy", "val_annotations.npz", "meta.json"])
def test_corrupt_cache_is_a_clear_error(tmp_path, damaged):
    folder = generate_scenes(tmp_path, num_images=(3, 4, 3), progress=False)
    path = folder / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(RuntimeError, match=f"{damaged}.*corrupt.*delete the folder"):
        ScenesDataset(tmp_path, "val", num_images=(3, 4, 3), progress=False)


def test_wrong_shape_in_cache_is_a_clear_error(tmp_path):
    folder = generate_scenes(tmp_path, num_images=(3, 4, 3), progress=False)
    np.save(folder / "test_images.npy", np.zeros((2, 3, SIZE, SIZE), np.uint8))
    with pytest.raises(RuntimeError, match=r"test_images.npy is corrupt \(expected uint8"):
        ScenesDataset(tmp_path, "test", num_images=(3, 4, 3), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "training"}, "split must be one of"),
        ({"seed": -1}, "seed must be an int >= 0, got -1"),
        ({"image_size": 16}, "image_size must be an int >= 32, got 16"),
        ({"num_images": (1, 2)}, r"num_images must be three ints >= 0 .*got \(1, 2\)"),
        ({"num_images": (1, -2, 3)}, "num_images must be three ints"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    arguments = {"split": "train", **kwargs}
    split = arguments.pop("split")
    with pytest.raises(ValueError, match=f"ScenesDataset: {message}"):
        ScenesDataset(tmp_path, split, progress=False, **arguments)
    assert not any(tmp_path.iterdir())  # nothing generated


def test_index_out_of_range(train):
    with pytest.raises(IndexError, match="ScenesDataset: index 300 out of range"):
        train[len(train)]


def test_default_root_and_open_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MLKERNELS_DATA", str(tmp_path / "data"))
    assert default_root() == tmp_path / "data" / "scenes"
    monkeypatch.delenv("MLKERNELS_DATA")
    assert default_root().parts[-3:] == (".cache", "mlkernels", "scenes")
    dataset = open_dataset(f"scenes:{tmp_path}", "val", num_images=(2, 3, 2), progress=False)
    assert isinstance(dataset, ScenesDataset) and len(dataset) == 3
    assert dataset.folder.parent == tmp_path
    fresh = tmp_path / "not" / "yet"  # a cache folder that does not exist is made
    dataset = open_dataset(f"scenes:{fresh}", "test", num_images=(2, 1, 2), progress=False)
    assert len(dataset) == 2 and dataset.folder.parent == fresh


def test_picture(tmp_path):
    path = tmp_path / "scenes.png"
    scenes.main(["--picture", str(path), "--size", "64", "--count", "3"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pickles_without_its_images(train):
    import pickle

    data = pickle.dumps(train)
    assert len(data) < 1_000_000  # the memory-mapped images stay on disk (300 x 49 KB)
    copy = pickle.loads(data)
    assert torch.equal(copy[7]["image"], train[7]["image"])
    assert torch.equal(copy[7]["boxes"], train[7]["boxes"])
