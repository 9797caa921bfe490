"""data/coco.py: robust RGB loading, COCO / Karpathy / folder datasets, skipping unreadable files."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from errors import BadInput

from data.coco import (CocoImageCaptionDataset, CocoImagesOnlyDataset, ImageFolderDataset, UnreadableImage,
                       collate_skip_none, image_transform, load_rgb, make_images_dataset)

W, H = 24, 16  # not square, so resize + centre crop is exercised
RED, WHITE = (255, 0, 0), (255, 255, 255)
SUBSET_ERROR = "--subset_ratio {} must be in (0, 1]"


def save_rgb(path):
    img = Image.new("RGB", (W, H), (0, 128, 255))
    img.save(path)


def save_gray(path):
    Image.new("L", (W, H), 100).save(path)


def save_la(path):
    a = np.zeros((H, W, 2), np.uint8)
    a[..., 0] = 50
    a[:, W // 2:, 1] = 255  # left half transparent, right half opaque grey 50
    Image.fromarray(a, "LA").save(path)


def save_palette(path):
    img = Image.new("P", (W, H), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 - 2) * 3)  # index 0 black, index 1 green
    img.paste(1, (W // 2, 0, W, H))
    img.save(path, transparency=0)  # left half (index 0) transparent


def save_rgba(path):
    a = np.zeros((H, W, 4), np.uint8)
    a[..., 0] = 255
    a[:, W // 2:, 3] = 255  # left half transparent (black underneath), right half opaque red
    Image.fromarray(a, "RGBA").save(path)


def save_cmyk(path):
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(path, quality=95)  # red


def save_gray16(path):
    a = np.zeros((H, W), np.uint16)
    a[:, :8], a[:, 8:16], a[:, 16:] = 0, 32896, 65535  # 0, half, full scale
    Image.fromarray(a).save(path)


def save_exif_rotated(path):
    # Stored 24x16 with a red top-left corner; orientation 6 = display rotated 90 degrees clockwise,
    # so the viewer sees it 16x24 with the red corner at the top right.
    img = Image.new("RGB", (W, H), (0, 0, 255))
    img.paste(RED, (0, 0, 6, 6))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes(), quality=95)


def save_truncated(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def save_not_image(path):
    with open(path, "w") as f:
        f.write("this is not an image\n")


GOOD = {"rgb.jpg": save_rgb, "gray.png": save_gray, "la.png": save_la, "palette.png": save_palette,
        "rgba.png": save_rgba, "cmyk.jpg": save_cmyk, "gray16.png": save_gray16, "exif.jpg": save_exif_rotated}
BAD = {"truncated.jpg": save_truncated, "notimage.jpg": save_not_image, "missing.jpg": None}


def make_coco(root, split="val"):
    """A COCO 2017 layout: every good mode, three bad files, two captions per image, and one image
    without captions. Returns {file_name: image_id}."""
    image_dir = os.path.join(root, f"{split}2017")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annotations, ids = [], [], {}
    for i, (name, save) in enumerate({**GOOD, **BAD, "nocaption.png": save_rgb}.items()):
        image_id = 100 + i
        ids[name] = image_id
        if save is not None:
            save(os.path.join(image_dir, name))
        images.append({"id": image_id, "file_name": name, "width": W, "height": H,
                       "scene": {"objects": [{"colour": "red"}], "position": "left", "relation": None},
                       "heldout": name == "gray.png"})
        if name != "nocaption.png":
            for k in range(2):
                annotations.append({"id": len(annotations), "image_id": image_id, "caption": f" {name} caption {k}\n"})
    with open(os.path.join(root, "annotations", f"captions_{split}2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return ids


@pytest.fixture
def coco_root(tmp_path):
    root = str(tmp_path / "coco")
    return root, make_coco(root)


def pixel(img, x, y):
    return np.asarray(img)[y, x].tolist()


def close(a, b, tol=6):  # JPEG is lossy
    return all(abs(int(p) - int(q)) <= tol for p, q in zip(a, b))


# ---------------------------------------------------------------------------------------------
# load_rgb

def test_load_rgb_every_mode(tmp_path):
    paths = {}
    for name, save in GOOD.items():
        paths[name] = str(tmp_path / name)
        save(paths[name])
    assert Image.open(paths["gray16.png"]).mode.startswith("I")  # really a 16-bit file
    assert Image.open(paths["cmyk.jpg"]).mode == "CMYK"
    assert Image.open(paths["palette.png"]).mode == "P"
    out = {name: load_rgb(p) for name, p in paths.items()}
    for name, img in out.items():
        assert img.mode == "RGB", name
        assert img.size == ((H, W) if name == "exif.jpg" else (W, H)), name
    assert pixel(out["gray.png"], 0, 0) == [100] * 3
    assert pixel(out["la.png"], 0, 0) == list(WHITE) and pixel(out["la.png"], W - 1, 0) == [50] * 3
    assert pixel(out["palette.png"], 0, 0) == list(WHITE) and pixel(out["palette.png"], W - 1, 0) == [0, 255, 0]
    assert pixel(out["rgba.png"], 0, 0) == list(WHITE) and pixel(out["rgba.png"], W - 1, 0) == list(RED)
    assert close(pixel(out["cmyk.jpg"], W // 2, H // 2), RED)
    # 16-bit scaled to 8-bit (half scale -> 128), not clipped (which would give 255)
    assert [pixel(out["gray16.png"], x, 0)[0] for x in (0, 12, W - 1)] == [0, 128, 255]


def test_load_rgb_other_high_bit_depths(tmp_path):
    # PGM with maxval 65535 opens as mode "I"; an int32 TIFF beyond 16 bits is stretched to its range.
    pgm = tmp_path / "gray.pgm"
    pgm.write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 32896, 65535], ">u2").tobytes())
    assert Image.open(pgm).mode == "I"
    assert [p[0] for p in np.asarray(load_rgb(str(pgm)))[0]] == [0, 128, 255]
    tif = str(tmp_path / "wide.tif")
    Image.fromarray(np.array([[0, 50000, 100000]], np.int32)).save(tif)
    assert [p[0] for p in np.asarray(load_rgb(tif))[0]] == [0, 128, 255]


def test_exif_rotation_moves_the_red_corner(tmp_path):
    path = str(tmp_path / "exif.jpg")
    save_exif_rotated(path)
    raw = Image.open(path)
    assert raw.getexif()[0x0112] == 6 and close(pixel(raw, 1, 1), RED)  # stored: red at top left
    img = load_rgb(path)
    assert img.size == (H, W)
    assert close(pixel(img, H - 2, 1), RED)  # displayed: red at top right
    assert close(pixel(img, 1, 1), (0, 0, 255))


@pytest.mark.parametrize("name", sorted(BAD))
def test_load_rgb_unreadable(tmp_path, name):
    path = str(tmp_path / name)
    if BAD[name]:
        BAD[name](path)
    with pytest.raises(UnreadableImage) as e:
        load_rgb(path)
    assert e.value.path == path and path in str(e.value) and e.value.reason


def test_image_transform_shape_and_range(tmp_path):
    x = image_transform(8)(Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1


# ---------------------------------------------------------------------------------------------
# COCO datasets

def test_caption_dataset_skips_and_counts_unreadable(coco_root):
    root, ids = coco_root
    ds = CocoImageCaptionDataset(root, split="val", image_size=8)
    assert len(ds) == 2 * (len(GOOD) + len(BAD))  # one item per caption; nocaption.png has none
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
        items += [ds[i] for i in range(len(ds))]  # a second epoch: no new warnings, same count
    assert ds.num_skipped == len(BAD)
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(BAD), messages
    for name in BAD:
        assert sum(os.path.join(root, "val2017", name) in m for m in messages) == 1, (name, messages)
    good = [it for it in items if it is not None]
    assert len(good) == 2 * 2 * len(GOOD)
    for it in good:
        assert it["pixel_values"].shape == (3, 8, 8) and it["pixel_values"].dtype == torch.float32
        assert 0 <= it["pixel_values"].min() and it["pixel_values"].max() <= 1
        assert isinstance(it["caption"], str) and it["caption"] == it["caption"].strip()
        assert ds.items[it["index"]] == (it["image_id"], it["caption"])
    bad_ids = {ids[name] for name in BAD}
    assert all((it is None) == (ds.items[i % len(ds)][0] in bad_ids) for i, it in enumerate(items))

    # collate drops the unreadable items; a batch of nothing but unreadable ones is None
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip_none)
    batches = list(loader)
    assert sum(b["pixel_values"].shape[0] for b in batches if b is not None) == 2 * len(GOOD)
    batch = collate_skip_none([ds[0], None, ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and len(batch["caption"]) == 2
    assert batch["image_id"].dtype == torch.int64
    bad_items = [i for i, (image_id, _) in enumerate(ds.items) if image_id in bad_ids]
    assert collate_skip_none([ds[i] for i in bad_items]) is None


def test_caption_dataset_evaluation_views(coco_root):
    root, ids = coco_root
    ds = CocoImageCaptionDataset(root, split="val", image_size=8)
    assert ds.image_ids == [ids[n] for n in {**GOOD, **BAD}]  # file order, captionless image left out
    assert ds.captions_by_image[ids["gray.png"]] == ["gray.png caption 0", "gray.png caption 1"]
    info = ds.images_info[ids["gray.png"]]
    assert info["heldout"] is True and info["scene"]["position"] == "left" and info["file_name"] == "gray.png"
    assert ds.image_path(ids["rgb.jpg"]) == os.path.join(root, "val2017", "rgb.jpg")


def test_images_only_dataset(coco_root):
    root, ids = coco_root
    ds = CocoImagesOnlyDataset(root, split="val", image_size=8)
    assert len(ds) == len(ids) and ds.image_ids == list(ids.values())  # captionless image included
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == len(BAD)
    for i, it in enumerate(items):
        if it is None:
            continue
        assert set(it) == {"pixel_values", "image_id", "index"}
        assert it["index"] == i and it["image_id"] == ds.image_ids[i]
        assert it["pixel_values"].shape == (3, 8, 8)


def test_missing_annotation_file(coco_root):
    root, _ = coco_root
    with pytest.raises(BadInput) as e:
        CocoImageCaptionDataset(root, split="train", image_size=8)
    msg = str(e.value)
    assert "\n" not in msg and "captions_train2017.json does not exist" in msg and "--data_dir" in msg


def test_karpathy_split(tmp_path):
    root = str(tmp_path / "coco")
    os.makedirs(os.path.join(root, "train2014"))
    os.makedirs(os.path.join(root, "val2014"))
    os.makedirs(os.path.join(root, "val2017"))
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test", "train"]):
        filepath = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{filepath}_{i:012d}.jpg"
        if i == 1:  # only the COCO 2017 copy of this one is on disk
            save_rgb(os.path.join(root, "val2017", f"{i:012d}.jpg"))
        else:
            save_rgb(os.path.join(root, filepath, filename))
        entries.append({"filepath": filepath, "filename": filename, "cocoid": i, "split": split,
                        "sentences": [{"raw": f"image {i} a"}, {"raw": f"image {i} b"}]})
    kjson = str(tmp_path / "dataset_coco.json")
    with open(kjson, "w") as f:
        json.dump({"images": entries, "dataset": "coco"}, f)

    train = CocoImageCaptionDataset(root, split="train", image_size=8, karpathy_json=kjson)
    assert train.image_ids == [0, 1, 4]  # train + restval
    assert train.captions_by_image[1] == ["image 1 a", "image 1 b"]
    assert train.images_info[1]["split"] == "restval" and "sentences" not in train.images_info[1]
    assert len(train) == 6
    assert train.image_path(0) == os.path.join(root, "train2014", "COCO_train2014_000000000000.jpg")
    assert train.image_path(1) == os.path.join(root, "val2017", "000000000001.jpg")
    assert all(train[i] is not None for i in range(len(train))) and train.num_skipped == 0
    test = CocoImagesOnlyDataset(root, split="test", image_size=8, karpathy_json=kjson)
    assert test.image_ids == [3] and test[0]["image_id"] == 3
    with pytest.raises(BadInput) as e:
        CocoImageCaptionDataset(root, split="validation", image_size=8, karpathy_json=kjson)
    assert "--split validation is not a Karpathy split; use one of train, val, test, restval" in str(e.value)


def write_many_images_json(root, n):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(n)]
    anns = [{"id": i, "image_id": i, "caption": f"c{i}"} for i in range(n)]
    with open(os.path.join(root, "annotations", "captions_train2017.json"), "w") as f:
        json.dump({"images": images, "annotations": anns}, f)


def test_subset_ratio_is_deterministic(tmp_path):
    root = str(tmp_path)
    write_many_images_json(root, 40)  # selection needs no image files

    def ids(cls=CocoImagesOnlyDataset, **kw):
        return cls(root, split="train", image_size=8, **kw).image_ids

    a = ids(subset_ratio=0.25, seed=0)
    assert len(a) == 10 and a == sorted(a)
    assert a == ids(subset_ratio=0.25, seed=0)  # same on every process / run
    assert a == ids(CocoImageCaptionDataset, subset_ratio=0.25, seed=0)  # stage 1 and stage 2 agree
    assert a != ids(subset_ratio=0.25, seed=1)
    assert ids(subset_ratio=1.0) == list(range(40))
    assert len(ids(subset_ratio=1e-6)) == 1  # never empty


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, float("nan"), "abc"])
def test_bad_subset_ratio(tmp_path, ratio):
    root = str(tmp_path)
    write_many_images_json(root, 4)
    for make in (lambda: CocoImageCaptionDataset(root, "train", 8, subset_ratio=ratio),
                 lambda: make_images_dataset(root, "train", 8, subset_ratio=ratio),
                 lambda: ImageFolderDataset(root, 8, subset_ratio=ratio)):
        with pytest.raises(BadInput) as e:
            make()
        assert SUBSET_ERROR.format(ratio) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Image folders and make_images_dataset

def make_folder(root):
    os.makedirs(os.path.join(root, "b", "deeper"))
    os.makedirs(os.path.join(root, ".hidden"))
    for rel in ["z.PNG", "a.jpg", "b/c.JpEg", "b/deeper/d.webp", "b/e.bmp", "b/f.TIF", "b/g.tiff"]:
        save_rgb(os.path.join(root, rel))
    save_rgb(os.path.join(root, ".hidden", "h.png"))
    save_not_image(os.path.join(root, "notes.txt"))
    save_not_image(os.path.join(root, "b", "broken.png"))
    return root


def test_image_folder_dataset(tmp_path):
    root = make_folder(str(tmp_path / "imgs"))
    ds = ImageFolderDataset(root, image_size=8)
    rel = [os.path.relpath(p, root) for p in ds.files]
    assert rel == sorted(rel) and len(rel) == 8
    assert set(rel) == {"z.PNG", "a.jpg", "b/c.JpEg", "b/deeper/d.webp", "b/e.bmp", "b/f.TIF", "b/g.tiff",
                        "b/broken.png"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert [it is None for it in items] == [r == "b/broken.png" for r in rel]
    assert ds.num_skipped == 1 and len(caught) == 1 and "broken.png" in str(caught[0].message)
    it = items[0]
    assert it["pixel_values"].shape == (3, 8, 8) and it["index"] == 0 and it["image_id"] == 0
    half = ImageFolderDataset(root, image_size=8, subset_ratio=0.5, seed=3)
    assert half.files == ImageFolderDataset(root, image_size=8, subset_ratio=0.5, seed=3).files
    assert len(half) == 4 and set(half.files) <= set(ds.files)


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    folder = str(tmp_path / "empty")
    msg = f"--data_dir {folder} holds no images (.jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff, searched recursively)"
    for make in (lambda: ImageFolderDataset(folder, 8), lambda: make_images_dataset(folder, "train", 8)):
        with pytest.raises(BadInput) as e:
            make()
        assert msg in str(e.value)


def test_make_images_dataset_picks_layout(coco_root, tmp_path):
    root, ids = coco_root
    ds = make_images_dataset(root, "val", 8, 1.0, None, 0)
    assert isinstance(ds, CocoImagesOnlyDataset) and len(ds) == len(ids)
    folder = make_folder(str(tmp_path / "imgs"))
    assert isinstance(make_images_dataset(folder, "train", 8, 1.0, None, 0), ImageFolderDataset)


def test_missing_data_dir(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(BadInput) as e:
        make_images_dataset(missing, "train", 8)
    assert f"--data_dir {missing} does not exist" in str(e.value) and "or a folder of images" in str(e.value)
    with pytest.raises(BadInput) as e:
        CocoImageCaptionDataset(missing, "val", 8)
    assert f"--data_dir {missing} does not exist" in str(e.value) and "val2017/" in str(e.value)
