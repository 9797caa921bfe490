"""The pixel judge reads the true scene back from rendered images, and notices when it is wrong."""
import numpy as np
from PIL import Image

from data import toy_world as tw
from data.judge import judge_accuracy, judge_image


def rendered(n, seed):
    rng = np.random.default_rng(seed)
    scenes = [tw.sample_scene(rng, heldout=bool(i % 3 == 0)) for i in range(n)]
    return scenes, [tw.render_scene(s, rng) for s in scenes]


def test_judge_reads_rendered_scenes():
    scenes, images = rendered(300, seed=11)
    acc = judge_accuracy(images, scenes)
    assert set(acc) == {"colour", "shape", "size", "position", "relation", "all"}
    assert acc["all"] >= 0.99, acc
    # any input size and arrays work the same
    big = [im.resize((96, 96), Image.NEAREST) for im in images[:50]]
    assert judge_accuracy(big, scenes[:50])["all"] >= 0.99
    assert judge_image(np.asarray(images[0])) == judge_image(images[0])


def recolour(image, old, new):
    """Repaint every object pixel of colour `old` with `new`, keeping its anti-aliased coverage."""
    px = np.asarray(image, np.float32)
    bg, a, b = (np.array(c, np.float32) for c in (tw.BACKGROUND, tw.COLOURS[old], tw.COLOURS[new]))
    alpha = np.clip((px - bg) @ (a - bg) / ((a - bg) @ (a - bg)), 0, 1)[..., None]
    near = np.linalg.norm(px - (bg + alpha * (a - bg)), axis=2, keepdims=True) < 20
    out = np.where(near & (alpha > 0.05), bg + alpha * (b - bg), px)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def test_judge_sees_a_wrong_colour():
    scene = {"objects": [{"colour": "red", "shape": "square", "size": "large"}], "position": "left",
             "relation": None}
    image = tw.render_scene(scene, np.random.default_rng(0))
    assert tw.attribute_scores(judge_image(image), scene)["all"]
    wrong = recolour(image, "red", "green")
    judged = judge_image(wrong)
    assert judged["objects"][0]["colour"] == "green"
    scores = tw.attribute_scores(judged, scene)
    assert not scores["colour"] and not scores["all"]
    assert scores["shape"] and scores["size"] and scores["position"]
    # across many scenes: recolouring the first object always breaks "colour"
    scenes, images = rendered(60, seed=5)
    for scene, image in zip(scenes, images):
        old = scene["objects"][0]["colour"]
        new = next(c for c in tw.COLOURS if c != old and c not in {o["colour"] for o in scene["objects"]})
        assert not tw.attribute_scores(judge_image(recolour(image, old, new)), scene)["colour"]


def test_judge_empty_and_noise():
    blank = Image.new("RGB", (32, 32), tw.BACKGROUND)
    assert judge_image(blank)["objects"] == []
    scene = {"objects": [{"colour": "red", "shape": "circle", "size": "small"}], "position": "center",
             "relation": None}
    assert not tw.attribute_scores(judge_image(blank), scene)["all"]
    # a few stray pixels are not objects
    px = np.asarray(tw.render_scene(scene, np.random.default_rng(1))).copy()
    px[0, 0] = px[31, 31] = (255, 255, 255)
    assert tw.attribute_scores(judge_image(px), scene)["all"]
