"""The toy world: 32x32 images of one or two coloured shapes, with paraphrased captions.

Written in the COCO 2017 layout so the real COCO loader reads it:
    DIR/annotations/captions_{train,val}2017.json   (COCO captions + "scene" and "heldout" per image)
    DIR/train2017/{id:012d}.png   DIR/val2017/{id:012d}.png

    python -m data.toy_world --output_dir checkpoints/toy/data --num_train 20000 --num_val 200 --seed 0

A visual-name memory (an EVCap-style captioner's), one ImageFolder class per (colour, shape) name:
    python -m data.toy_world --memory_dir checkpoints/toy/memory --memory_per_name 8 --seed 0

A scene is a plain dict, the single source of truth for captions, rendering and scoring:
    {"objects": [{"colour", "shape", "size"}, ...], "position": str|None, "relation": str|None}
One object has a position; two objects have a relation of the first w.r.t. the second.
Some (colour, shape) pairs (HELDOUT) never appear in train; part of val holds them, so a model's
compositional generalisation can be measured ("heldout": true on those val images).
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from data.files import atomic_path, save_json
import errors
from errors import BadInput

# Well separated in RGB so a nearest-colour rule reads them back from blurry samples.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (230, 220, 40),
    "purple": (170, 60, 210),
    "white": (240, 240, 240),
}
BACKGROUND = (16, 16, 24)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
HELDOUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "circle"))

IMAGE_SIZE = 32
SCALE = 4  # drawn at 128 px and box-downsampled: exact area anti-aliasing
EXTENT = {"small": (7.5, 9.5), "large": (12.0, 13.5)}  # bounding-box side in 32-px units
TWO_OBJECT_FRACTION = 0.3
HELDOUT_VAL_FRACTION = 0.3
VAL_ID_OFFSET = 1_000_000  # val ids do not depend on num_train

# Caption wording. Every phrase maps back through parse_caption's keywords.
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "on the top", "near the top"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom"),
    "center": ("in the center", "in the middle", "at the center"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
ONE_TEMPLATES = (
    "a {obj} {pos}",
    "there is a {obj} {pos}",
    "an image of a {obj} {pos}",
    "a picture showing a {obj} {pos}",
    "{pos} there is a {obj}",
    "a single {obj} {pos}",
)
# {a} is the first object, {b} the second; templates with {inv} name them the other way round.
TWO_TEMPLATES = (
    "a {a} {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "image of a {a} {rel} a {b}",
    "a {b} {inv} a {a}",
    "there is a {b} {inv} a {a}",
    "picture of a {b} {inv} a {a}",
)
CAPTIONS_PER_IMAGE = 5

# parse_caption keywords
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                   "center": "center", "middle": "center"}
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "over": "above",
                   "below": "below", "under": "below"}


# ---------------------------------------------------------------------------------------------
# Scenes and captions

def is_heldout(scene):
    return any((o["colour"], o["shape"]) in HELDOUT for o in scene["objects"])


def _sample_object(rng, pairs):
    colour, shape = pairs[rng.integers(len(pairs))]
    return {"colour": colour, "shape": shape, "size": SIZES[rng.integers(len(SIZES))]}


def sample_scene(rng, heldout=False):
    """A random scene. heldout=False: only seen (colour, shape) pairs; True: at least one object
    has a held-out pair."""
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT]
    n = 2 if rng.random() < TWO_OBJECT_FRACTION else 1
    objects = [_sample_object(rng, seen) for _ in range(n)]
    if heldout:
        objects[rng.integers(n)] = _sample_object(rng, list(HELDOUT))
    if n == 1:
        return {"objects": objects, "position": POSITIONS[rng.integers(len(POSITIONS))], "relation": None}
    return {"objects": objects, "position": None, "relation": RELATIONS[rng.integers(len(RELATIONS))]}


def _object_words(o):
    return f"{o['size']} {o['colour']} {o['shape']}"


def make_captions(scene, rng, k=CAPTIONS_PER_IMAGE):
    """k distinct paraphrases of the scene (all <= 14 words, no punctuation)."""
    objs = scene["objects"]
    templates = ONE_TEMPLATES if len(objs) == 1 else TWO_TEMPLATES
    order = rng.permutation(len(templates))[:k]
    captions = []
    for i in order:
        if len(objs) == 1:
            phrases = POSITION_PHRASES[scene["position"]]
            captions.append(templates[i].format(obj=_object_words(objs[0]),
                                                pos=phrases[rng.integers(len(phrases))]))
        else:
            rel, inv = RELATION_PHRASES[scene["relation"]], RELATION_PHRASES[INVERSE[scene["relation"]]]
            captions.append(templates[i].format(a=_object_words(objs[0]), b=_object_words(objs[1]),
                                                rel=rel[rng.integers(len(rel))],
                                                inv=inv[rng.integers(len(inv))]))
    return captions


def caption_vocabulary():
    """Every word a toy caption can use (for word-level tokenizers)."""
    words = set(COLOURS) | set(SHAPES) | set(SIZES)
    for text in (*ONE_TEMPLATES, *TWO_TEMPLATES, *sum(POSITION_PHRASES.values(), ()),
                 *sum(RELATION_PHRASES.values(), ())):
        words |= {w for w in text.split() if not w.startswith("{")}
    return sorted(words)


def parse_caption(text):
    """Keyword parser: caption -> scene. Objects are read as (size? colour? shape) runs ended by a
    shape word; missing attributes and unknown position/relation are None."""
    words = str(text).lower().replace(",", " ").replace(".", " ").split()
    objects, current, spans, start = [], {}, [], None
    for i, w in enumerate(words):
        if w in SIZES or w in COLOURS:
            current["size" if w in SIZES else "colour"] = w
            start = i if start is None else start
        elif w in SHAPES:
            objects.append({"colour": current.get("colour"), "shape": w, "size": current.get("size")})
            spans.append((i if start is None else start, i))
            current, start = {}, None
    scene = {"objects": objects, "position": None, "relation": None}
    if len(objects) == 1:
        found = [_POSITION_WORDS[w] for w in words if w in _POSITION_WORDS]
        scene["position"] = found[0] if found else None
    elif len(objects) >= 2:
        between = words[spans[0][1] + 1:spans[1][0]]  # "... circle to the left of a ... square"
        found = [_RELATION_WORDS[w] for w in between if w in _RELATION_WORDS]
        scene["relation"] = found[0] if found else None
    return scene


def canonical(scene):
    """Two-object scenes ordered (left, right) or (top, bottom), so "A left of B" == "B right of A"."""
    scene = {"objects": [dict(o) for o in scene.get("objects") or []],
             "position": scene.get("position"), "relation": scene.get("relation")}
    if len(scene["objects"]) == 2 and scene["relation"] in ("right of", "below"):
        scene["objects"].reverse()
        scene["relation"] = INVERSE[scene["relation"]]
    return scene


def attribute_scores(pred_scene, true_scene):
    """Which attributes a prediction (parsed caption or judged image) gets right.

    Returns {"colour", "shape", "size", "position" (one object) or "relation" (two), "all"} -> bool.
    A wrong number of objects gets everything wrong. Two objects: each predicted object is scored
    against the true object it resembles most (in canonical order, or swapped when the swap matches
    strictly more attributes), and the relation is right only when it is true of those objects:
    "a red circle left of a blue square" for a scene with the circle on the right gets colour,
    shape and size right and the relation wrong (the order is the relation's error, not the
    attributes')."""
    true = canonical(true_scene)
    pred = canonical(pred_scene or {})
    where = "position" if len(true["objects"]) == 1 else "relation"
    keys = ("colour", "shape", "size", where)
    if len(pred["objects"]) != len(true["objects"]):
        return {**{k: False for k in keys}, "all": False}

    def hits(objects):  # attribute -> [right?] per object
        return {a: [p.get(a) == t[a] for p, t in zip(objects, true["objects"])] for a in ("colour", "shape", "size")}

    hit, in_order = hits(pred["objects"]), True
    if len(pred["objects"]) == 2:
        swapped = hits(pred["objects"][::-1])
        if sum(map(sum, swapped.values())) > sum(map(sum, hit.values())):
            hit, in_order = swapped, False
    out = {a: all(v) for a, v in hit.items()}
    out[where] = in_order and pred[where] is not None and pred[where] == true[where]
    out["all"] = all(out.values())
    return out


def grouped_accuracy(results, entries):
    """results: attribute_scores dicts; entries: the image entries they belong to ({"scene",
    "heldout"}). -> {group: {"num_images": n, attr: {"correct", "total", "accuracy"}}} for the
    groups "seen", "heldout", "overall" and, apart, each split by its number of objects ("seen, 1
    object", "seen, 2 objects", ...): two objects are the hard part (the relation)."""
    members = {"seen": [], "heldout": [], "overall": []}
    for result, entry in zip(results, entries):
        split = "heldout" if entry.get("heldout") else "seen"
        n = len(entry["scene"]["objects"])
        for name in (split, f"{split}, {n} object{'s' if n > 1 else ''}", "overall"):
            members.setdefault(name, []).append(result)
    return {name: {"num_images": len(group), **attribute_counts(group)} for name, group in members.items()}


def attribute_counts(results):
    """{attr: {"correct", "total", "accuracy"}} over attribute_scores results. An attribute that only
    some results have ("position" vs "relation") counts over those; one that none has is left out."""
    cells = {}
    for result in results:
        for attr, ok in result.items():
            cell = cells.setdefault(attr, {"correct": 0, "total": 0})
            cell["correct"] += int(bool(ok))
            cell["total"] += 1
    for cell in cells.values():
        cell["accuracy"] = cell["correct"] / cell["total"]
    return cells


def accuracy(results):
    """Fraction right per attribute over attribute_scores results (attribute_counts' accuracies)."""
    return {attr: cell["accuracy"] for attr, cell in attribute_counts(results).items()}


# ---------------------------------------------------------------------------------------------
# Layout and rendering

def _half_extents(shape, e):
    """(left, right, up, down) from the centroid to the bbox sides: a triangle's centroid sits
    1/3 of its height above its base."""
    if shape == "triangle":
        return e / 2, e / 2, 2 * e / 3, e / 3
    return e / 2, e / 2, e / 2, e / 2


def _sample_layout(scene, rng):
    """Centroid (cx, cy) and bbox side per object, in 32-px units: inside the image with a 1-px
    margin, and two objects' boxes at least 2 px apart (so they stay separate components)."""
    objects = scene["objects"]
    extents = [float(rng.uniform(*EXTENT[o["size"]])) for o in objects]
    halves = [_half_extents(o["shape"], e) for o, e in zip(objects, extents)]
    ranges = [((1.0 + l, IMAGE_SIZE - 1.0 - r), (1.0 + u, IMAGE_SIZE - 1.0 - d)) for l, r, u, d in halves]
    c = IMAGE_SIZE / 2
    if len(objects) == 1:
        (xlo, xhi), (ylo, yhi) = ranges[0]
        # off-centre distance clear of the judge's +-4 px centre box; small drift across
        along, across = float(rng.uniform(6.5, 9.0)), float(rng.uniform(-2.0, 2.0))
        cx, cy = {"left": (c - along, c + across), "right": (c + along, c + across),
                  "top": (c + across, c - along), "bottom": (c + across, c + along),
                  "center": (c + float(rng.uniform(-2, 2)), c + float(rng.uniform(-2, 2)))}[scene["position"]]
        return [(float(np.clip(cx, xlo, xhi)), float(np.clip(cy, ylo, yhi)), extents[0])]
    # Two objects. Along the relation's axis: the free space is split at random into the margin
    # before, the extra gap between and the margin after (so the boxes never overlap). Across it:
    # centroids at most 3 px apart, so the relation's axis is the dominant one.
    horizontal = scene["relation"] in ("left of", "right of")
    first_low = scene["relation"] in ("left of", "above")      # first object nearer 0 on that axis
    low, high = (0, 1) if first_low else (1, 0)
    h_low = halves[low][:2] if horizontal else halves[low][2:]   # (toward 0, away from 0)
    h_high = halves[high][:2] if horizontal else halves[high][2:]
    slack = IMAGE_SIZE - 2.0 - 2.0 - sum(h_low) - sum(h_high)
    u = rng.dirichlet((1.0, 1.0, 1.0)) * slack
    along = [0.0, 0.0]
    along[low] = 1.0 + u[0] + h_low[0]
    along[high] = along[low] + h_low[1] + 2.0 + u[1] + h_high[0]
    axis = 1 if horizontal else 0  # index of the across axis in ranges
    while True:
        across = [float(rng.uniform(*ranges[i][axis])) for i in range(2)]
        if abs(across[0] - across[1]) <= 3.0:
            break
    pts = [(along[i], across[i]) if horizontal else (across[i], along[i]) for i in range(2)]
    return [(x, y, e) for (x, y), e in zip(pts, extents)]


def _draw_object(draw, colour, shape, cx, cy, e):
    s = SCALE
    fill = COLOURS[colour]
    l, r, u, d = _half_extents(shape, e)
    box = [(cx - l) * s, (cy - u) * s, (cx + r) * s, (cy + d) * s]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upward triangle
        draw.polygon([(cx * s, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)


def render_scene(scene, rng):
    """Scene -> 32x32 RGB PIL image, layout drawn from rng. Every shape's centroid sits where the
    layout puts it (the judge reads centroids)."""
    return _render(scene["objects"], _sample_layout(scene, rng))


def _render(objects, layout):
    big = Image.new("RGB", (IMAGE_SIZE * SCALE, IMAGE_SIZE * SCALE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for o, (cx, cy, e) in zip(objects, layout):
        _draw_object(draw, o["colour"], o["shape"], cx, cy, e)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


# ---------------------------------------------------------------------------------------------
# Data set files

def _split(out_dir, split, n, seed, id_offset, heldout_fraction):
    # One RNG stream per split: val does not change when num_train changes.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    img_dir = os.path.join(out_dir, f"{split}2017")
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image_id = id_offset + i + 1
        scene = sample_scene(rng, heldout=bool(rng.random() < heldout_fraction))
        file_name = f"{image_id:012d}.png"
        with atomic_path(os.path.join(img_dir, file_name)) as tmp:
            render_scene(scene, rng).save(tmp, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": IMAGE_SIZE,
                       "height": IMAGE_SIZE, "scene": scene, "heldout": is_heldout(scene)})
        for caption in make_captions(scene, rng):
            annotations.append({"id": len(annotations) + 1 + id_offset * CAPTIONS_PER_IMAGE,
                                "image_id": image_id, "caption": caption})
    ann = {
        "info": {"description": f"toy world {split} split, seed {seed}", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    path = os.path.join(ann_dir, f"captions_{split}2017.json")
    save_json(path, ann)
    return path


VAL_WORLD_SEED = 1  # the pipeline's world is seed 0


def val_world(run, num_val):
    """RUN/val_world_N: a fresh toy val split of num_val images (another seed than the run's data),
    generated on first use, for benchmark cells finer than the 200 val images' 1/131."""
    path = os.path.join(run, f"val_world_{num_val}")
    if not os.path.isfile(os.path.join(path, "annotations", "captions_val2017.json")):
        generate(path, num_train=0, num_val=num_val, seed=VAL_WORLD_SEED)
    return path


def generate(out_dir, num_train, num_val, seed=0):
    """Write the toy world in the COCO 2017 layout; same arguments -> same bytes."""
    if not 0 <= num_train < VAL_ID_OFFSET or num_val < 0:
        raise BadInput(f"--num_train must be in [0, {VAL_ID_OFFSET}) and --num_val >= 0")
    train = _split(out_dir, "train", num_train, seed, 0, heldout_fraction=0.0)
    val = _split(out_dir, "val", num_val, seed, VAL_ID_OFFSET, heldout_fraction=HELDOUT_VAL_FRACTION)
    return train, val


# ---------------------------------------------------------------------------------------------
# Visual-name memory: one folder of single-object images per (colour, shape) name

def folder_of(colour, shape):
    return f"{colour}_{shape}"


def name_of(folder):
    """A memory folder's name: "red_circle" (or its path) -> "red circle"."""
    return os.path.basename(os.path.normpath(folder)).replace("_", " ")


def render_object(colour, shape, rng):
    """One object of a random size anywhere in the image (1-px margin), drawn as the data set draws
    its objects: the memory's images differ from the data set's only in where the object sits."""
    size = SIZES[rng.integers(len(SIZES))]
    e = float(rng.uniform(*EXTENT[size]))
    l, r, u, d = _half_extents(shape, e)
    cx = float(rng.uniform(1.0 + l, IMAGE_SIZE - 1.0 - r))
    cy = float(rng.uniform(1.0 + u, IMAGE_SIZE - 1.0 - d))
    return _render([{"colour": colour, "shape": shape, "size": size}], [(cx, cy, e)])


def write_name_folders(out_dir, per_name=8, seed=0):
    """For every (colour, shape) pair, held-out pairs included (a memory of names is what lets a
    captioner name an unseen pair), `per_name` images at out_dir/<colour>_<shape>/<k>.png: an
    ImageFolder layout whose folder name, underscore read as a space (name_of), is the name.
    Same arguments -> same bytes; one RNG stream per pair, so a pair's first k images are the same
    for any per_name >= k.
    Returns {"<colour> <shape>": [paths]}."""
    if not isinstance(per_name, int) or per_name < 1:
        raise BadInput(f"--memory_per_name {per_name} must be a positive integer")
    written = {}
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            rng = np.random.default_rng([seed, 2, ci, si])  # streams 0, 1: the train and val splits
            folder = os.path.join(out_dir, folder_of(colour, shape))
            os.makedirs(folder, exist_ok=True)
            paths = []
            for k in range(per_name):
                path = os.path.join(folder, f"{k}.png")
                with atomic_path(path) as tmp:
                    render_object(colour, shape, rng).save(tmp, format="PNG")
                paths.append(path)
            # Images left by an earlier, larger per_name would join the memory: remove them.
            for name in os.listdir(folder):
                stem, ext = os.path.splitext(name)
                if ext == ".png" and stem.isdigit() and int(stem) >= per_name:
                    os.remove(os.path.join(folder, name))
            written[f"{colour} {shape}"] = paths
    return written


def pair_scenes(per_pair, seed=0):
    """per_pair two-object images of every unordered pair of (colour, shape) names, held-out pairs and
    a name with itself included, drawn as the data set draws its two-object scenes (sizes, relation
    and which object comes first at random): what a memory that knows scenes of two objects would
    hold. Yields (the names in the image, sorted, as a tuple; 32x32 RGB PIL image)."""
    names = [(c, s) for c in COLOURS for s in SHAPES]
    rng = np.random.default_rng([seed, 3])  # streams 0-2: the splits and the name folders
    for i, a in enumerate(names):
        for b in names[i:]:
            for _ in range(per_pair):
                first, second = (a, b) if rng.random() < 0.5 else (b, a)
                objects = [{"colour": c, "shape": s, "size": SIZES[rng.integers(len(SIZES))]} for c, s in (first, second)]
                scene = {"objects": objects, "position": None, "relation": RELATIONS[rng.integers(len(RELATIONS))]}
                yield tuple(sorted({f"{c} {s}" for c, s in (a, b)})), render_scene(scene, rng)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", help="write the data set (COCO 2017 layout) here")
    p.add_argument("--num_train", type=int, default=20000)
    p.add_argument("--num_val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory_dir", help="write the visual-name memory here: DIR/<colour>_<shape>/<k>.png for "
                                        "every pair, held-out ones included")
    p.add_argument("--memory_per_name", type=int, default=8, help="images per name in --memory_dir")
    args = p.parse_args(argv)
    if not args.output_dir and not args.memory_dir:
        p.error("pass --output_dir (the data set), --memory_dir (the name memory), or both")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.output_dir:
        train, val = generate(args.output_dir, args.num_train, args.num_val, args.seed)
        print(f"wrote {args.num_train} train and {args.num_val} val images: {train}, {val}")
    if args.memory_dir:
        names = write_name_folders(args.memory_dir, args.memory_per_name, args.seed)
        print(f"wrote {args.memory_per_name} images for each of {len(names)} names: {args.memory_dir}")


if __name__ == "__main__":
    errors.run(main)
