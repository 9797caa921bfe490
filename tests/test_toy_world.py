"""The toy world generator: determinism, COCO layout, held-out split, captions and scoring."""
import hashlib
import itertools
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from data import toy_world as tw


def digest(folder):
    """One hash over every file's relative path and bytes."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    tw.generate(out, num_train=300, num_val=100, seed=3)
    return out


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    tw.main(["--output_dir", str(tmp_path / "again"), "--num_train", "300", "--num_val", "100", "--seed", "3"])
    assert digest(world) == digest(str(tmp_path / "again"))
    tw.generate(str(tmp_path / "other"), num_train=300, num_val=100, seed=4)
    assert digest(world) != digest(str(tmp_path / "other"))


def test_val_does_not_depend_on_num_train(world, tmp_path):
    tw.generate(str(tmp_path / "fewer"), num_train=10, num_val=100, seed=3)
    assert digest(os.path.join(world, "val2017")) == digest(str(tmp_path / "fewer" / "val2017"))


@pytest.mark.parametrize("split,n", [("train", 300), ("val", 100)])
def test_coco_layout_loads_with_pycocotools(world, split, n):
    coco = COCO(os.path.join(world, "annotations", f"captions_{split}2017.json"))
    ids = coco.getImgIds()
    assert len(ids) == n
    for image_id in ids[:20]:
        info = coco.loadImgs(image_id)[0]
        assert os.path.isfile(os.path.join(world, f"{split}2017", info["file_name"]))
        assert info["file_name"] == f"{image_id:012d}.png"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        captions = [a["caption"] for a in anns]
        assert len(captions) == 5 and len(set(captions)) == 5
        for c in captions:
            assert len(c.split()) <= 14
            assert tw.canonical(tw.parse_caption(c)) == tw.canonical(info["scene"])
        json.dumps(info["scene"])  # plain JSON


def test_heldout_pairs_only_in_val(world):
    with open(os.path.join(world, "annotations", "captions_train2017.json")) as f:
        train = json.load(f)["images"]
    with open(os.path.join(world, "annotations", "captions_val2017.json")) as f:
        val = json.load(f)["images"]
    pairs = lambda img: {(o["colour"], o["shape"]) for o in img["scene"]["objects"]}
    assert not any(pairs(img) & set(tw.HELDOUT) for img in train)
    assert not any(img["heldout"] for img in train)
    held = [img for img in val if img["heldout"]]
    assert 10 <= len(held) <= 60  # about 30% of val
    for img in val:
        assert img["heldout"] == bool(pairs(img) & set(tw.HELDOUT))
    assert set().union(*(pairs(img) for img in held)) & set(tw.HELDOUT)
    # a fair share of two-object scenes in both splits
    for images in (train, val):
        two = np.mean([len(img["scene"]["objects"]) == 2 for img in images])
        assert 0.15 < two < 0.45


def every_caption(scene):
    """Every template with every phrase variant, for one scene."""
    objs = scene["objects"]
    words = lambda o: f"{o['size']} {o['colour']} {o['shape']}"
    if len(objs) == 1:
        for t, pos in itertools.product(tw.ONE_TEMPLATES, tw.POSITION_PHRASES[scene["position"]]):
            yield t.format(obj=words(objs[0]), pos=pos)
    else:
        rels = tw.RELATION_PHRASES[scene["relation"]]
        invs = tw.RELATION_PHRASES[tw.INVERSE[scene["relation"]]]
        for t, rel, inv in itertools.product(tw.TWO_TEMPLATES, rels, invs):
            yield t.format(a=words(objs[0]), b=words(objs[1]), rel=rel, inv=inv)


def test_parse_caption_recovers_every_template():
    rng = np.random.default_rng(0)
    scenes = [{"objects": [{"colour": "red", "shape": "circle", "size": "small"}], "position": p, "relation": None}
              for p in tw.POSITIONS]
    scenes += [{"objects": [{"colour": "blue", "shape": "square", "size": "large"},
                            {"colour": "white", "shape": "triangle", "size": "small"}],
                "position": None, "relation": r} for r in tw.RELATIONS]
    scenes += [tw.sample_scene(rng, heldout=bool(i % 2)) for i in range(50)]
    n = 0
    for scene in scenes:
        for caption in every_caption(scene):
            assert len(caption.split()) <= 14, caption
            assert set(caption.split()) <= set(tw.caption_vocabulary()), caption
            parsed = tw.parse_caption(caption)
            assert tw.canonical(parsed) == tw.canonical(scene), caption
            assert tw.attribute_scores(parsed, scene)["all"], caption
            n += 1
    assert n > 500


def test_parse_caption_unknown_words_give_none():
    scene = tw.parse_caption("a circle somewhere")
    assert scene["objects"] == [{"colour": None, "shape": "circle", "size": None}]
    assert scene["position"] is None
    assert tw.parse_caption("nothing here") == {"objects": [], "position": None, "relation": None}
    scores = tw.attribute_scores(scene, {"objects": [{"colour": "red", "shape": "circle", "size": "small"}],
                                         "position": "left", "relation": None})
    assert scores == {"colour": False, "shape": True, "size": False, "position": False, "all": False}


def test_canonical_left_of_equals_right_of():
    a = {"colour": "red", "shape": "circle", "size": "small"}
    b = {"colour": "blue", "shape": "square", "size": "large"}
    left = {"objects": [a, b], "position": None, "relation": "left of"}
    right = {"objects": [b, a], "position": None, "relation": "right of"}
    above = {"objects": [a, b], "position": None, "relation": "above"}
    below = {"objects": [b, a], "position": None, "relation": "below"}
    assert tw.canonical(left) == tw.canonical(right)
    assert tw.canonical(above) == tw.canonical(below)
    assert tw.canonical(left) != tw.canonical(above)
    assert tw.attribute_scores(right, left)["all"]
    assert tw.parse_caption("a small red circle to the left of a large blue square") == left
    assert tw.canonical(tw.parse_caption("a large blue square to the right of a small red circle")) == \
        tw.canonical(left)
    # swapped colours are a colour error, not a match
    swapped = {"objects": [dict(a, colour="blue"), dict(b, colour="red")], "position": None, "relation": "left of"}
    scores = tw.attribute_scores(swapped, left)
    assert not scores["colour"] and scores["shape"] and scores["relation"] and not scores["all"]
    # the right objects in the wrong order: a relation error, the attributes are right
    flipped = {"objects": [b, a], "position": None, "relation": "left of"}
    assert tw.attribute_scores(flipped, left) == {"colour": True, "shape": True, "size": True,
                                                  "relation": False, "all": False}
    flipped_axis = {"objects": [b, a], "position": None, "relation": "above"}
    assert not tw.attribute_scores(flipped_axis, left)["relation"]
    # a wrong number of objects gets everything wrong
    assert not any(tw.attribute_scores({"objects": [a], "position": "left"}, left).values())


def test_name_memory_folders(tmp_path):
    from PIL import Image

    from data.judge import judge_image

    out = str(tmp_path / "memory")
    tw.main(["--memory_dir", out, "--memory_per_name", "3", "--seed", "5"])
    pairs = [(c, s) for c in tw.COLOURS for s in tw.SHAPES]
    assert sorted(os.listdir(out)) == sorted(f"{c}_{s}" for c, s in pairs)
    assert set(tw.HELDOUT) <= set(pairs)  # held-out pairs have folders too
    bg = np.array(tw.BACKGROUND)
    for colour, shape in pairs:
        folder = os.path.join(out, f"{colour}_{shape}")
        assert tw.name_of(folder) == f"{colour} {shape}"
        assert sorted(os.listdir(folder)) == ["0.png", "1.png", "2.png"]
        for name in os.listdir(folder):
            img = Image.open(os.path.join(folder, name))
            assert img.size == (tw.IMAGE_SIZE, tw.IMAGE_SIZE) and img.mode == "RGB"
            px = np.asarray(img).reshape(-1, 3)
            fg = px[np.abs(px.astype(int) - bg).sum(1) > 0]
            values, counts = np.unique(fg, axis=0, return_counts=True)
            assert tuple(values[counts.argmax()]) == tw.COLOURS[colour]  # the fill dominates
            scene = judge_image(img)  # the judge reads back one object of that colour and shape
            assert [(o["colour"], o["shape"]) for o in scene["objects"]] == [(colour, shape)]
    # deterministic per seed; a smaller per_name keeps the first images and drops the rest
    again = tw.write_name_folders(str(tmp_path / "again"), per_name=3, seed=5)
    assert digest(out) == digest(str(tmp_path / "again")) and len(again) == len(pairs)
    tw.write_name_folders(str(tmp_path / "other"), per_name=3, seed=6)
    assert digest(out) != digest(str(tmp_path / "other"))
    first = open(os.path.join(out, "red_circle", "0.png"), "rb").read()
    tw.write_name_folders(out, per_name=1, seed=5)
    assert os.listdir(os.path.join(out, "red_circle")) == ["0.png"]
    assert open(os.path.join(out, "red_circle", "0.png"), "rb").read() == first
    # images of random sizes and positions, not one drawing copied
    sizes = {judge_image(Image.open(p))["objects"][0]["size"] for p in tw.write_name_folders(
        str(tmp_path / "many"), 12, 0)["green square"]}
    assert sizes == {"small", "large"}


def test_pair_scenes_draw_every_pair_of_names_as_the_judge_reads_them():
    from data.judge import judge_image

    scenes = list(tw.pair_scenes(2, seed=0))
    names = [f"{c} {s}" for c in tw.COLOURS for s in tw.SHAPES]
    assert len(scenes) == 2 * len(names) * (len(names) + 1) // 2     # every unordered pair, a name with itself too
    assert {n for n, _ in scenes} == {tuple(sorted({a, b})) for a in names for b in names}
    for held in tw.HELDOUT:  # held-out names pair up as well
        assert any(f"{held[0]} {held[1]}" in n and len(n) == 2 for n, _ in scenes)
    for n, image in scenes:
        read = judge_image(image)["objects"]
        assert len(read) == 2 and {f"{o['colour']} {o['shape']}" for o in read} == set(n)
    # same seed, same images; another seed, others
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(scenes, tw.pair_scenes(2, seed=0)))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(scenes, tw.pair_scenes(2, seed=1)))


def test_cli_needs_an_output(capsys):
    with pytest.raises(SystemExit):
        tw.main(["--num_train", "3"])
    assert "--output_dir" in capsys.readouterr().err
