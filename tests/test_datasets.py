"""The VOC 2007, COCO and NUS-WIDE loaders (models.data.voc, .coco, .nuswide) on tiny datasets
written here in the real layouts: sample format, labels against the written annotations, class
order, box conventions, split mappings, options, image modes and malformed files."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import models.data
from models.data.coco import COCODataset
from models.data.nuswide import NUSWIDEDataset
from models.data.voc import VOC_CLASSES, VOC2007Dataset

# ---- writers ----------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode="RGB"):
    """A flat ``color`` image of ``size`` (width, height) stored in ``mode``.

    ``mode`` "RGB", "L" (stored gray: ``color`` must be gray), "CMYK" (a CMYK JPEG) or "P" (a
    palette PNG under the .jpg name, as some web downloads are). Returns the RGB colour a
    correct reader gives back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if mode == "L":
        assert color[0] == color[1] == color[2]
        image = Image.new("L", size, color[0])
    elif mode == "CMYK":
        image = image.convert("CMYK")
    elif mode == "P":
        image = image.convert("P")
        image.save(path, format="PNG")
        return image.convert("RGB").getpixel((0, 0))
    image.save(path, format="JPEG", quality=100)
    with Image.open(path) as written:
        return written.convert("RGB").getpixel((0, 0))


def assert_flat_image(image: torch.Tensor, size: tuple[int, int], color) -> None:
    """``image`` is Tensor[3, H, W] uint8 of the (width, height) ``size``, all ``color`` (up to
    JPEG rounding)."""
    assert image.dtype == torch.uint8 and image.shape == (3, size[1], size[0])
    expected = torch.tensor(color, dtype=torch.int16).view(3, 1, 1)
    assert (image.to(torch.int16) - expected).abs().max() <= 2


def assert_sample_format(dataset, sample: dict, index: int) -> None:
    """The sample format of models.data, exactly."""
    assert set(sample) == {"image", "labels", "boxes", "box_classes", "index"}
    assert sample["index"] == index and type(sample["index"]) is int
    image = sample["image"]
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
    assert sample["labels"].dtype == torch.float32
    assert sample["labels"].shape == (dataset.num_classes,)
    assert torch.equal(sample["labels"], dataset.labels[index])
    assert set(sample["labels"].tolist()) <= {1.0, 0.0, -1.0}
    boxes, box_classes = sample["boxes"], sample["box_classes"]
    assert boxes.dtype == torch.float32 and boxes.dim() == 2 and boxes.shape[1] == 4
    assert box_classes.dtype == torch.int64 and box_classes.shape == (len(boxes),)
    if len(boxes):
        height, width = image.shape[1:]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


def assert_dataset_format(dataset) -> None:
    """Attributes of models.data, and every sample's format; objects agree with the samples."""
    assert len(dataset.classes) == dataset.num_classes
    assert all(isinstance(name, str) for name in dataset.classes)
    assert dataset.labels.dtype == torch.float32
    assert dataset.labels.shape == (len(dataset), dataset.num_classes)
    objects = dataset.objects
    assert set(objects) == {"image", "class", "area_fraction"}
    assert objects["image"].dtype == torch.int64 and objects["class"].dtype == torch.int64
    assert objects["area_fraction"].dtype == torch.float32
    assert objects["image"].shape == objects["class"].shape == objects["area_fraction"].shape
    images, classes, fractions = [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        assert_sample_format(dataset, sample, i)
        boxes = sample["boxes"].double()
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        images += [i] * len(boxes)
        classes += sample["box_classes"].tolist()
        fractions += (area / (sample["image"].shape[1] * sample["image"].shape[2])).tolist()
    assert objects["image"].tolist() == images
    assert objects["class"].tolist() == classes
    torch.testing.assert_close(objects["area_fraction"], torch.tensor(fractions).float())


# VOC: image id -> (size, color, mode, [(name, difficult, (xmin, ymin, xmax, ymax) 1-based)])
VOC_IMAGES = {
    "000001": ((40, 30), (200, 30, 90), "RGB", [("dog", 0, (1, 1, 40, 30))]),
    "000002": (
        (50, 40),
        (10, 120, 250),
        "RGB",
        [
            ("person", 0, (10, 20, 30, 40)),
            ("cat", 1, (2, 3, 12, 13)),  # cat only difficult
            ("person", 1, (5, 5, 9, 9)),  # person difficult and not
            ("tvmonitor", 0, (1, 1, 2, 2)),
        ],
    ),
    "000003": ((32, 24), (128, 128, 128), "L", [("aeroplane", 0, (3, 4, 20, 24))]),
    "000004": ((20, 20), (255, 0, 0), "CMYK", [("bottle", 1, (1, 1, 10, 10))]),
    "000005": ((24, 16), (0, 255, 0), "P", []),
    "000006": ((30, 30), (40, 40, 200), "RGB", [("aeroplane", 0, (1, 1, 30, 30))] * 2),
}
VOC_SETS = {
    "trainval": ["000001", "000002", "000003"],
    "val": ["000002"],
    "test": ["000004", "000005", "000006"],
}


def voc_xml(image_id: str, size, objects) -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
        f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
        for name, difficult, box in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size>"
        f"<width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{body}</annotation>"
    )


def write_voc(tmp_path: Path, images=VOC_IMAGES, sets=VOC_SETS) -> tuple[Path, dict]:
    """A VOCdevkit/VOC2007 tree; returns (its path, image id -> RGB colour read back)."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    colors = {}
    for image_id, (size, color, mode, objects) in images.items():
        colors[image_id] = write_image(root / "JPEGImages" / f"{image_id}.jpg", size, color, mode)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, size, objects))
    for name, ids in sets.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    return root, colors


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path)


# ---- VOC 2007 ---------------------------------------------------------------------------------


def test_voc_classes_are_the_20_in_standard_order(voc):
    dataset = VOC2007Dataset(voc[0], "train")
    assert dataset.classes == list(VOC_CLASSES) and dataset.num_classes == 20
    assert dataset.classes[:3] == ["aeroplane", "bicycle", "bird"]
    assert dataset.classes[-3:] == ["sofa", "train", "tvmonitor"]
    assert sorted(dataset.classes) == dataset.classes  # the VOC order is alphabetical


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("difficult", ["ignore", "positive", "negative"])
def test_voc_format_labels_boxes_and_images(voc, split, difficult):
    root, colors = voc
    dataset = VOC2007Dataset(root, split, difficult=difficult)
    ids = VOC_SETS["trainval" if split == "train" else split]
    assert dataset.ids == ids and len(dataset) == len(ids)
    assert_dataset_format(dataset)
    for i, image_id in enumerate(ids):
        size, _, _, objects = VOC_IMAGES[image_id]
        sample = dataset[i]
        assert_flat_image(sample["image"], size, colors[image_id])
        # Expected, written out per mode from the annotation.
        kept = [o for o in objects if not (difficult == "negative" and o[1])]
        expected = torch.zeros(20)
        for name, is_difficult, _ in kept:
            k = VOC_CLASSES.index(name)
            if not is_difficult or difficult == "positive":
                expected[k] = 1
        if difficult == "ignore":
            for name, is_difficult, _ in kept:
                k = VOC_CLASSES.index(name)
                if is_difficult and expected[k] == 0:
                    expected[k] = -1
        assert torch.equal(sample["labels"], expected)
        boxes = [[x1 - 1, y1 - 1, x2, y2] for _, _, (x1, y1, x2, y2) in kept]
        assert sample["boxes"].tolist() == boxes
        assert sample["box_classes"].tolist() == [VOC_CLASSES.index(o[0]) for o in kept]


@pytest.mark.parametrize(
    "difficult, cat, person, tv, boxes",
    [("ignore", -1, 1, 1, 4), ("positive", 1, 1, 1, 4), ("negative", 0, 1, 1, 2)],
)
def test_voc_difficult_modes(voc, difficult, cat, person, tv, boxes):
    # 000002: cat only difficult, person difficult and not, tvmonitor not difficult.
    dataset = VOC2007Dataset(voc[0], "val", difficult=difficult)
    labels = dataset[0]["labels"]
    assert labels[VOC_CLASSES.index("cat")] == cat
    assert labels[VOC_CLASSES.index("person")] == person
    assert labels[VOC_CLASSES.index("tvmonitor")] == tv
    assert (labels != 0).sum() == (3 if difficult != "negative" else 2)
    assert len(dataset[0]["boxes"]) == boxes


def test_voc_boxes_are_0_based_xyxy(voc):
    dataset = VOC2007Dataset(voc[0], "train")
    # 000001: (1, 1, 40, 30) 1-based inclusive covers the whole 40x30 image.
    assert dataset[0]["boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0]]
    assert dataset.objects["area_fraction"][0] == 1.0
    assert dataset[1]["boxes"][0].tolist() == [9.0, 19.0, 30.0, 40.0]
    assert dataset[1]["boxes"][3].tolist() == [0.0, 0.0, 2.0, 2.0]  # 2x2 pixels


def test_voc_accepts_the_vocdevkit_folder_and_open_dataset(voc):
    root = voc[0]
    via_parent = VOC2007Dataset(root.parent, "test", difficult="positive")
    dataset = models.data.open_dataset("voc2007:" + str(root), "test", difficult="positive")
    assert isinstance(dataset, VOC2007Dataset) and dataset.difficult == "positive"
    assert via_parent.ids == dataset.ids == VOC_SETS["test"]
    assert torch.equal(via_parent.labels, dataset.labels)
    assert_sample_format(dataset, dataset[2], 2)


@pytest.mark.parametrize("image_id", ["000003", "000004", "000005"])
def test_voc_grayscale_cmyk_palette_images_are_rgb(voc, image_id):
    root, colors = voc
    split = "train" if image_id == "000003" else "test"
    dataset = VOC2007Dataset(root, split)
    image = dataset[dataset.ids.index(image_id)]["image"]
    assert_flat_image(image, VOC_IMAGES[image_id][0], colors[image_id])
    if image_id == "000003":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_voc_transform_and_index_range(voc):
    def transform(sample):
        sample["image"] = sample["image"][:, :4, :4]
        sample["seen"] = True
        return sample

    dataset = VOC2007Dataset(voc[0], "train", transform=transform)
    sample = dataset[1]
    assert sample["seen"] and sample["image"].shape == (3, 4, 4) and sample["index"] == 1
    assert dataset[-1]["index"] == 2
    with pytest.raises(IndexError, match="VOC2007Dataset: index 3 out of range"):
        dataset[3]


def test_voc_box_outside_by_rounding_is_clipped(tmp_path):
    images = {"000001": ((40, 30), (9, 9, 9), "RGB", [("dog", 0, (0, 1, 41, 30))])}
    root, _ = write_voc(tmp_path, images, {"trainval": ["000001"]})
    assert VOC2007Dataset(root, "train")[0]["boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0]]


def test_voc_bad_options(voc):
    with pytest.raises(ValueError, match="difficult must be"):
        VOC2007Dataset(voc[0], "train", difficult="drop")
    with pytest.raises(ValueError, match="split must be one of"):
        VOC2007Dataset(voc[0], "trainval")


def _voc_case(root: Path, case: str) -> tuple[Path, type, str]:
    """Break the VOC tree at ``root`` in one way; returns (the file an error must name, its
    type, a part of its message)."""
    xml = root / "Annotations" / "000002.xml"
    if case == "bad xml":
        xml.write_text(xml.read_text()[:-20])
        return xml, ValueError, "not valid XML"
    if case == "unknown class":
        xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>kitten</name>"))
        return xml, ValueError, "unknown class name 'kitten'"
    if case == "missing element":
        xml.write_text(xml.read_text().replace("<ymax>40</ymax>", ""))
        return xml, ValueError, "has no <ymax>"
    if case == "not a number":
        xml.write_text(xml.read_text().replace("<ymax>40</ymax>", "<ymax>forty</ymax>"))
        return xml, ValueError, "not a number"
    if case == "box outside":
        xml.write_text(xml.read_text().replace("<ymax>40</ymax>", "<ymax>42</ymax>"))
        return xml, ValueError, "outside the 50x40 image"
    if case == "inverted box":
        xml.write_text(xml.read_text().replace("<xmax>30</xmax>", "<xmax>5</xmax>"))
        return xml, ValueError, "not a box"
    if case == "missing annotation":
        xml.unlink()
        return xml, FileNotFoundError, "not found"
    if case == "missing image":
        image = root / "JPEGImages" / "000002.jpg"
        image.unlink()
        return image, FileNotFoundError, "not found"
    if case == "missing folder":
        folder = root / "JPEGImages"
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
        return folder, FileNotFoundError, "expected the layout"
    if case == "missing image set":
        image_set = root / "ImageSets" / "Main" / "trainval.txt"
        image_set.unlink()
        return image_set, FileNotFoundError, "expected the layout"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "bad xml",
        "unknown class",
        "missing element",
        "not a number",
        "box outside",
        "inverted box",
        "missing annotation",
        "missing image",
        "missing folder",
        "missing image set",
    ],
)
def test_voc_malformed_files_are_errors_naming_the_file(voc, case):
    file, error, message = _voc_case(voc[0], case)
    with pytest.raises(error) as caught:
        VOC2007Dataset(voc[0], "train")
    assert str(file) in str(caught.value) and message in str(caught.value)


def test_voc_missing_test_set_says_where_it_comes_from(voc):
    (voc[0] / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt.*VOCtest_06-Nov-2007.tar"):
        VOC2007Dataset(voc[0], "test")


def test_voc_unreadable_or_resized_image_is_an_error_naming_it(voc):
    dataset = VOC2007Dataset(voc[0], "train")
    image = voc[0] / "JPEGImages" / "000001.jpg"
    Image.new("RGB", (41, 30)).save(image, format="JPEG")
    with pytest.raises(ValueError, match=re.escape(str(image)) + " is 41x30 .* says 40x30"):
        dataset[0]
    image.write_bytes(image.read_bytes()[:40])
    with pytest.raises(ValueError, match=re.escape(str(image)) + " cannot be read"):
        dataset[0]


# ---- COCO -------------------------------------------------------------------------------------

# Out of id order, with gaps like the real 1..90.
COCO_CATEGORIES = [
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 44, "name": "bottle", "supercategory": "kitchen"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]
COCO_ORDER = ["person", "dog", "bottle", "toothbrush"]  # by id: 1, 18, 44, 90


def coco_subset(first_id: int, count: int, annotate) -> tuple[list, list]:
    """``count`` images with ids from ``first_id`` (listed in reverse id order) and their
    annotations from ``annotate(k)`` -> [(category_id, [x, y, w, h], iscrowd)]."""
    images, annotations = [], []
    for k in range(count):
        image_id = first_id + 7 * k
        images.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 32 + k, "height": 24}
        )
        for category_id, bbox, crowd in annotate(k):
            annotations.append(
                {
                    "id": 1000 + len(annotations) + first_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": bbox,
                    "iscrowd": crowd,
                    "area": bbox[2] * bbox[3],
                    "segmentation": [],
                }
            )
    return images[::-1], annotations


def train_annotations(k: int):
    if k == 3:
        return []  # no annotation
    if k == 4:
        return [(44, [0, 0, 10, 10], 1)]  # crowd only
    if k == 5:
        return [(18, [2.5, 3.5, 34.5, 20.5], 0)]  # x + w = 32 + k, y + h = 24: to the edges
    return [(1, [1, 2, 3, 4], 0), (90, [0, 0, 5, 5], 0), (1, [4, 4, 2, 2], 0)][: 1 + k % 3]


def val_annotations(k: int):
    if k == 3:  # outside its 35x24 image by rounding slips (clipped)
        return [(1, [-0.5, 20, 10, 4.75], 0), (90, [30, 0, 5.5, 24.5], 0)]
    return [] if k == 0 else [(18, [k, k, 8, 6], 0), (44, [0, 0, 0.0, 3], 0)]


def write_coco(tmp_path: Path, year: int, train_count=10, val_count=4) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for subset, first_id, count, annotate in [
        ("train", 9, train_count, train_annotations),
        ("val", 3, val_count, val_annotations),
    ]:
        images, annotations = coco_subset(first_id, count, annotate)
        for image in images:
            write_image(
                root / f"{subset}{year}" / image["file_name"],
                (image["width"], image["height"]),
                (image["id"] % 256, 100, 50),
            )
        data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
        data["categories"] = COCO_CATEGORIES
        (root / "annotations" / f"instances_{subset}{year}.json").write_text(json.dumps(data))
    return root


@pytest.fixture(params=[2014, 2017])
def coco(tmp_path, request):
    return write_coco(tmp_path, request.param), request.param


def expected_coco(first_id: int, annotate, positions) -> tuple[list[int], torch.Tensor, list]:
    """(image ids, labels, xyxy boxes) of the images at ``positions`` (in id order)."""
    ids, labels, boxes = [], [], []
    for k in positions:
        ids.append(first_id + 7 * k)
        row = torch.zeros(4)
        image_boxes = []
        for category_id, (x, y, w, h), _ in annotate(k):
            row[[1, 18, 44, 90].index(category_id)] = 1
            width, height = 32 + k, 24
            image_boxes.append([max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)])
        labels.append(row)
        boxes.append(image_boxes)
    return ids, torch.stack(labels), boxes


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("without_annotations", ["keep", "drop"])
def test_coco_format_class_order_labels_boxes(coco, split, without_annotations):
    root, year = coco
    dataset = COCODataset(root, split, without_annotations=without_annotations)
    assert dataset.year == year
    assert dataset.classes == COCO_ORDER and dataset.num_classes == 4
    if split == "test":
        positions, first_id, annotate = range(4), 3, val_annotations
    else:
        # val: every 20th image of train in id order, i.e. position 0 of these 10.
        positions = [0] if split == "val" else range(1, 10)
        first_id, annotate = 9, train_annotations
    if without_annotations == "drop":
        positions = [k for k in positions if annotate(k)]
    ids, labels, boxes = expected_coco(first_id, annotate, positions)
    assert dataset.image_ids == ids
    assert torch.equal(dataset.labels, labels)
    assert_dataset_format(dataset)
    for i, image_id in enumerate(ids):
        sample = dataset[i]
        assert sample["boxes"].tolist() == boxes[i]
        assert_flat_image(sample["image"], (32 + positions[i], 24), (image_id % 256, 100, 50))


def test_coco_without_annotations_and_crowd(coco):
    root, _ = coco
    kept = COCODataset(root, "train")
    dropped = COCODataset(root, "train", without_annotations="drop")
    no_annotation, crowd_only = 9 + 7 * 3, 9 + 7 * 4
    assert no_annotation in kept.image_ids and no_annotation not in dropped.image_ids
    assert kept.labels[kept.image_ids.index(no_annotation)].sum() == 0
    assert len(kept[kept.image_ids.index(no_annotation)]["boxes"]) == 0
    # Crowd annotations mark their class (and keep the image under "drop").
    i = dropped.image_ids.index(crowd_only)
    assert dropped.labels[i].tolist() == [0, 0, 1, 0]
    assert dropped[i]["boxes"].tolist() == [[0, 0, 10, 10]]
    assert len(dropped) == len(kept) - 1


def test_coco_splits_partition_train_and_test_is_val(tmp_path):
    root = write_coco(tmp_path, 2014, train_count=45, val_count=2)
    train, val = COCODataset(root, "train"), COCODataset(root, "val")
    all_ids = [9 + 7 * k for k in range(45)]
    assert val.image_ids == [all_ids[0], all_ids[20], all_ids[40]]
    assert sorted(train.image_ids + val.image_ids) == all_ids
    assert COCODataset(root, "test").image_ids == [3, 10]


def test_coco_year_detection_and_open_dataset(tmp_path):
    root = write_coco(tmp_path, 2017)
    dataset = models.data.open_dataset("coco:" + str(root), "test", without_annotations="drop")
    assert isinstance(dataset, COCODataset) and dataset.year == 2017 and len(dataset) == 3
    assert_sample_format(dataset, dataset[1], 1)
    write_coco(tmp_path, 2014)
    with pytest.raises(ValueError, match="COCO 2014 and 2017; pass year="):
        COCODataset(root, "test")
    assert COCODataset(root, "test", year=2014).year == 2014
    with pytest.raises(ValueError, match="year must be one of"):
        COCODataset(root, "test", year=2012)
    with pytest.raises(ValueError, match="without_annotations must be"):
        COCODataset(root, "test", year=2014, without_annotations="zero")


def _coco_case(root: Path, year: int, case: str) -> tuple[Path, type, str]:
    """Break the COCO tree in one way (its train annotations); returns (the file an error must
    name, its type, a part of its message)."""
    path = root / "annotations" / f"instances_train{year}.json"
    data = json.loads(path.read_text())
    if case == "truncated json":
        path.write_text(path.read_text()[:-30])
        return path, ValueError, "not valid JSON"
    if case == "not an instances file":
        path.write_text("[1, 2]")
        return path, ValueError, "not a COCO instances file"
    if case == "unknown category":
        data["annotations"][2]["category_id"] = 2
        path.write_text(json.dumps(data))
        return path, ValueError, "category_id 2, not one of the file's categories [1, 18, 44, 90]"
    if case == "unknown image":
        data["annotations"][2]["image_id"] = 5
        path.write_text(json.dumps(data))
        return path, ValueError, "refers to image id 5"
    if case == "bad bbox":
        data["annotations"][2]["bbox"] = [1, 2, 3]
        path.write_text(json.dumps(data))
        return path, ValueError, "bbox [1, 2, 3], expected [x, y, width, height]"
    if case == "box outside":
        data["annotations"][2]["bbox"] = [30, 0, 40, 10]
        path.write_text(json.dumps(data))
        return path, ValueError, "outside the"
    if case == "image without size":
        del data["images"][4]["width"]
        path.write_text(json.dumps(data))
        return path, ValueError, "needs 'file_name', 'width' and 'height'"
    if case == "missing image":
        image = root / f"train{year}" / data["images"][-2]["file_name"]
        image.unlink()
        return image, FileNotFoundError, "not found"
    if case == "missing image folder":
        folder = root / f"train{year}"
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
        return folder, FileNotFoundError, "expected the layout"
    if case == "missing annotations":
        path.unlink()
        return path, FileNotFoundError, "expected the layout"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "truncated json",
        "not an instances file",
        "unknown category",
        "unknown image",
        "bad bbox",
        "box outside",
        "image without size",
        "missing image",
        "missing image folder",
        "missing annotations",
    ],
)
def test_coco_malformed_files_are_errors_naming_the_file(coco, case):
    root, year = coco
    file, error, message = _coco_case(root, year, case)
    with pytest.raises(error) as caught:
        COCODataset(root, "train", year=year)
    assert str(file) in str(caught.value) and message in str(caught.value)


def test_coco_missing_annotations_folder(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "coco" / "annotations"))):
        COCODataset(tmp_path / "coco", "train")
    (tmp_path / "coco" / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no instances_\{train,val\}\{2014,2017\}.json"):
        COCODataset(tmp_path / "coco", "train")


def test_coco_prints_nothing(coco, capsys):
    COCODataset(coco[0], "test")
    assert capsys.readouterr().out == ""


# ---- NUS-WIDE ---------------------------------------------------------------------------------

NUS_CONCEPTS = ["airport", "animal", "beach", "zebra"]


def nus_labels(part: str, k: int) -> list[int]:
    """Concept labels of image ``k`` of the ``part`` list (a fixed irregular pattern)."""
    k += 11 if part == "Test" else 0
    return [(k + 2 * c) % 3 == 0 or (k * (c + 1)) % 5 == 1 for c in range(len(NUS_CONCEPTS))]


def nus_name(part: str, k: int) -> str:
    return f"{NUS_CONCEPTS[k % 4]}\\{k:04d}_{part.lower()}{1000 + k}.jpg"


def write_nuswide(tmp_path: Path, train_count=23, test_count=5, missing=(3, 7)) -> Path:
    """A NUS-WIDE tree whose Train list has ``train_count`` images, those at ``missing``
    positions not on disk; image k of a list is (k, 2k, 100) coloured, grayscale when k % 5 ==
    4."""
    root = tmp_path / "nuswide"
    (root / "ImageList").mkdir(parents=True)
    labels = root / "Groundtruth" / "TrainTestLabels"
    labels.mkdir(parents=True)
    (root / "Concepts81.txt").write_text("".join(c + "\r\n" for c in NUS_CONCEPTS))
    for part, count in [("Train", train_count), ("Test", test_count)]:
        names = [nus_name(part, k) for k in range(count)]
        (root / "ImageList" / f"{part}Imagelist.txt").write_text("".join(n + "\r\n" for n in names))
        for c, concept in enumerate(NUS_CONCEPTS):
            lines = "".join(f"{int(nus_labels(part, k)[c])} \n" for k in range(count))
            (labels / f"Labels_{concept}_{part}.txt").write_text(lines)
        for k, name in enumerate(names):
            if part == "Train" and k in missing:
                continue
            gray = k % 5 == 4
            color = (k, k, k) if gray else (k, 2 * k, 100)
            write_image(
                root / "Flickr" / name.replace("\\", "/"),
                (20 + k, 16),
                color,
                "L" if gray else "RGB",
            )
    return root


@pytest.fixture
def nuswide(tmp_path):
    return write_nuswide(tmp_path)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_nuswide_format_labels_splits_and_skipped(nuswide, split):
    part = "Test" if split == "test" else "Train"
    listed = (
        range(5) if split == "test" else [k for k in range(23) if (k % 20 == 0) == (split == "val")]
    )
    missing = [k for k in listed if part == "Train" and k in (3, 7)]
    positions = [k for k in listed if k not in missing]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = NUSWIDEDataset(nuswide, split)
    assert dataset.classes == NUS_CONCEPTS and dataset.num_classes == 4
    assert dataset.skipped == [nus_name(part, k).replace("\\", "/") for k in missing]
    messages = [str(w.message) for w in caught]
    if missing:
        assert messages == [
            f"NUSWIDEDataset: skipped {len(missing)} of {len(listed)} images of split "
            f"{split!r} that are not under {nuswide / 'Flickr'} (see .skipped)"
        ]
    else:
        assert messages == []
    assert dataset.image_names == [nus_name(part, k).replace("\\", "/") for k in positions]
    expected = torch.tensor([nus_labels(part, k) for k in positions], dtype=torch.float32)
    assert torch.equal(dataset.labels, expected)
    assert_dataset_format(dataset)
    assert len(dataset.objects["image"]) == 0
    for i, k in enumerate(positions):
        sample = dataset[i]
        assert sample["boxes"].shape == (0, 4) and sample["box_classes"].shape == (0,)
        color = (k, k, k) if k % 5 == 4 else (k, 2 * k, 100)
        assert_flat_image(sample["image"], (20 + k, 16), color)


@pytest.mark.filterwarnings("ignore:NUSWIDEDataset. skipped")
def test_nuswide_labels_are_not_constant(nuswide):
    # The fixture's labels exercise both values of every concept (else the label test is weak).
    labels = NUSWIDEDataset(nuswide, "train").labels
    assert (labels.sum(0) > 0).all() and (labels.sum(0) < len(labels)).all()


def test_nuswide_open_dataset(nuswide):
    dataset = models.data.open_dataset("nuswide:" + str(nuswide), "test")
    assert isinstance(dataset, NUSWIDEDataset) and len(dataset) == 5 and dataset.skipped == []
    assert_sample_format(dataset, dataset[4], 4)


def _nuswide_case(root: Path, case: str) -> tuple[Path, type, str]:
    labels = root / "Groundtruth" / "TrainTestLabels" / "Labels_beach_Train.txt"
    if case == "too few labels":
        labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
        return labels, ValueError, "has 22 labels, but"
    if case == "too many labels":
        labels.write_text(labels.read_text() + "0\n")
        return labels, ValueError, "has 24 labels, but"
    if case == "bad label":
        labels.write_text(labels.read_text().replace("1", "2", 1))
        return labels, ValueError, "is '2', expected 0 or 1"
    if case == "missing labels":
        labels.unlink()
        return labels, FileNotFoundError, "expected the layout"
    if case == "empty concepts":
        (root / "Concepts81.txt").write_text("\n")
        return root / "Concepts81.txt", ValueError, "is empty"
    if case == "missing image list":
        path = root / "ImageList" / "TrainImagelist.txt"
        path.unlink()
        return path, FileNotFoundError, "expected the layout"
    if case == "missing flickr":
        flickr = root / "Flickr"
        flickr.rename(root / "images")
        return flickr, FileNotFoundError, "expected the layout"
    if case == "no image on disk":
        flickr = root / "Flickr"
        flickr.rename(root / "images")
        flickr.mkdir()
        return flickr, FileNotFoundError, "none of the 21 images of split 'train'"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "too few labels",
        "too many labels",
        "bad label",
        "missing labels",
        "empty concepts",
        "missing image list",
        "missing flickr",
        "no image on disk",
    ],
)
@pytest.mark.filterwarnings("ignore:NUSWIDEDataset. skipped")
def test_nuswide_malformed_files_are_errors_naming_the_file(nuswide, case):
    file, error, message = _nuswide_case(nuswide, case)
    with pytest.raises(error) as caught:
        NUSWIDEDataset(nuswide, "train")
    assert str(file) in str(caught.value) and message in str(caught.value)


def test_open_dataset_needs_a_path():
    with pytest.raises(ValueError, match="voc2007:PATH"):
        models.data.open_dataset("voc2007", "train")
