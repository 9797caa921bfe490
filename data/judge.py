"""Reads a toy-world scene back off the pixels of an image: a fixed rule, no learning.

Used to score generated images (does the teacher draw what its caption says?) with the same
attribute_scores as captions. Rule, on the image resized to 32x32:
  foreground = pixels far from the background colour; objects = its connected components
  (tiny ones are noise); colour = palette colour nearest the component's median pixel; shape =
  fill ratio area / bbox area (square ~1, circle ~0.79, triangle ~0.5); size = bbox side;
  position = centroid vs the image centre; relation = the two centroids.
"""
import numpy as np
from PIL import Image
from scipy import ndimage

from data.toy_world import BACKGROUND, COLOURS, IMAGE_SIZE, accuracy, attribute_scores, canonical

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], np.float32)   # [6,3]
_BG = np.array(BACKGROUND, np.float32)

FOREGROUND_DIST = 60.0   # RGB distance from the background that counts as foreground
MIN_AREA = 8.0           # components smaller than this (in pixels of coverage) are noise
LARGE_SIDE = 10.75       # bbox side (px) between small (7.5-9.5) and large (12-13.5)
CENTER_BOX = 4.0         # |centroid - centre| below this on both axes -> "center"
SQUARE_FILL, TRIANGLE_FILL = 0.89, 0.70   # fill-ratio cuts: square ~1, circle ~0.79, triangle ~0.5-0.66


def _to_array(img):
    """PIL image or uint8 HxWx3 array, any size -> float32 [32,32,3]."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        down = img.size[0] > IMAGE_SIZE
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX if down else Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _read_object(pixels, mask):
    """One component -> ({"colour","shape","size"}, (cx, cy), coverage) or None if too small."""
    rgb = pixels[mask]                                   # [n,3]
    # interior pixels carry the true colour; edge pixels are blended with the background
    far = rgb[np.linalg.norm(rgb - _BG, axis=1) >= np.percentile(np.linalg.norm(rgb - _BG, axis=1), 50)]
    median = np.median(far, axis=0)
    k = int(np.argmin(np.linalg.norm(_PALETTE - median, axis=1)))
    # coverage of each pixel by the object (anti-aliased edges are partial): projection of the
    # pixel onto the background->colour segment
    direction = _PALETTE[k] - _BG
    alpha = np.zeros(mask.shape, np.float32)
    alpha[mask] = np.clip((rgb - _BG) @ direction / (direction @ direction), 0.0, 1.0)
    area = float(alpha.sum())
    if area < MIN_AREA:
        return None
    # soft bbox sides: a column's largest coverage is the fraction of it the shape spans, so edge
    # columns count partly (a hard threshold would add up to a pixel per side)
    w, h = float(alpha.max(axis=0).sum()), float(alpha.max(axis=1).sum())
    fill = area / (w * h)
    shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= TRIANGLE_FILL else "triangle"
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    cx = float((alpha * (xx + 0.5)).sum() / area)        # pixel i spans [i, i+1]
    cy = float((alpha * (yy + 0.5)).sum() / area)
    size = "large" if max(w, h) >= LARGE_SIDE else "small"
    return {"colour": _NAMES[k], "shape": shape, "size": size}, (cx, cy), area


def judge_image(img):
    """Image -> scene dict (canonical order for two objects). Zero objects or more than two are
    returned as found (scored wrong against any toy scene)."""
    pixels = _to_array(img)
    foreground = np.linalg.norm(pixels - _BG, axis=2) > FOREGROUND_DIST
    labels, n = ndimage.label(foreground)                # 4-connectivity: touching corners split
    found = []
    for i in range(1, n + 1):
        obj = _read_object(pixels, labels == i)
        if obj is not None:
            found.append(obj)
    objects = [o for o, _, _ in found]
    scene = {"objects": objects, "position": None, "relation": None}
    c = IMAGE_SIZE / 2
    if len(found) == 1:
        cx, cy = found[0][1]
        dx, dy = cx - c, cy - c
        if abs(dx) < CENTER_BOX and abs(dy) < CENTER_BOX:
            scene["position"] = "center"
        elif abs(dx) >= abs(dy):
            scene["position"] = "left" if dx < 0 else "right"
        else:
            scene["position"] = "top" if dy < 0 else "bottom"
    elif len(found) == 2:
        (x0, y0), (x1, y1) = found[0][1], found[1][1]
        if abs(x0 - x1) >= abs(y0 - y1):
            scene["relation"] = "left of" if x0 < x1 else "right of"
        else:
            scene["relation"] = "above" if y0 < y1 else "below"
    return canonical(scene)


def judge_accuracy(images, scenes):
    """Fraction of images whose judged scene gets each attribute right ("all": every one).
    images: PIL images or uint8 arrays; scenes: the scenes they should show. Attributes absent
    from every scene (e.g. "relation" with one-object scenes only) are left out."""
    return accuracy(attribute_scores(judge_image(img), scene) for img, scene in zip(images, scenes))
