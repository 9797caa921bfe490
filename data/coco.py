"""COCO 2017 captions, the Karpathy split, and plain image folders, with robust RGB loading.

Layouts read:
    COCO 2017:  {data_dir}/annotations/captions_{split}2017.json, {data_dir}/{split}2017/{file_name}
                (the toy world writes the same layout; its image entries add "scene" and "heldout")
    Karpathy:   --karpathy_json dataset_coco.json; images at {data_dir}/{filepath}/{filename}, falling
                back to the COCO 2017 names {data_dir}/{train,val}2017/{cocoid:012d}.jpg when only
                COCO 2017 is on disk (the same photos under other names). split "train" = train + restval.
    Split folder: --data_dir {root}/train2017 (as the VLV README passes it), with no annotations/
                in it but in its parent: read as the COCO root {root} and split train (coco_root).
    Flickr30k:  data_format="flickr30k": captions.txt or results_20130124.token (data/flickr30k.py),
                read into the same records, so the datasets behave the same.
    Folder:     every image file under a directory, recursively, sorted.

Unreadable or missing images do not stop a run: `__getitem__` returns None, `collate_skip_none`
drops it, and the dataset records the file (`num_skipped`) and warns once per file. DataLoader
workers are separate processes holding their own copy of the dataset: with num_workers > 0 the
warnings still appear (from the worker that met the file) but the main process's `num_skipped`
stays 0; count with num_workers=0 when the exact number matters.
"""

import contextlib
import io
import json
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate
from torchvision import transforms

from errors import BadInput, UnreadableImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
DATA_FORMATS = ("coco", "flickr30k")
_SPLIT_FOLDER = re.compile(r"^(\w+)2017$")

# Files already warned about in this process (each DataLoader worker has its own set).
_warned_paths = set()


# ---------------------------------------------------------------------------------------------
# Loading any image as 8-bit RGB

def _high_bit_depth_to_l(img):
    """16/32-bit integer or float greyscale -> 8-bit L, scaled (PIL's own convert clips at 255)."""
    a = np.asarray(img)
    if a.size == 0:
        return Image.new("L", img.size)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (a.min(), a.max())
    else:
        a = a.astype(np.int64)
        # I;16* is 16-bit by definition; PIL also reads 16-bit PNG/PGM as "I" in the 0..65535 range.
        # Anything else (true 32-bit data) is stretched over its own range.
        in_16bit = img.mode.startswith("I;16") or (a.min() >= 0 and a.max() <= 65535)
        lo, hi = (0, 65535) if in_16bit else (a.min(), a.max())
    if hi <= lo:
        scaled = np.zeros(a.shape, np.uint8)
    else:
        scaled = np.round((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 [H,W] -> mode L


def _to_rgb(img):
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        # Transparent pixels hold arbitrary colours (often black); white is what a viewer shows.
        if img.mode == "La":  # premultiplied LA: PIL converts it only via LA
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, P, CMYK (naive inversion, ICC profile ignored), YCbCr, LAB, HSV; RGB -> a copy.
    return img.convert("RGB")


def load_rgb(path):
    """Any image file -> an 8-bit RGB PIL image, upright (EXIF orientation applied), transparency
    composited on white. Raises UnreadableImage(path, reason) for a missing, truncated or corrupt
    file or one that is not an image."""
    if not os.path.exists(path):
        raise UnreadableImage(path, "no such file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncation and corruption surface here, not later in a transform
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # a malformed EXIF block: the pixels are fine, keep them unrotated
                upright = img
            return _to_rgb(upright)
    except Exception as e:
        # PIL's decoders raise many types on damaged input (OSError, SyntaxError, ValueError,
        # struct.error, EOFError, DecompressionBombError, ...): all mean "this file is unusable".
        reason = str(e) or type(e).__name__
        raise UnreadableImage(path, reason) from e


def to_pil(image):
    """[3,H,W] float tensor in [0,1], uint8 HxWx3 array or PIL image -> PIL RGB image."""
    import torch
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):  # rounded: torchvision's to_pil_image of a float tensor truncates
        return transforms.functional.to_pil_image((image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8))
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def image_transform(image_size):
    """Shorter side -> image_size (bicubic, antialiased), centre crop, float tensor [3,S,S] in [0,1].
    No normalisation: each model normalises for itself."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
    ])


def read_pixels(path, transform, skipped=None):
    """transform(load_rgb(path)), or None for an unreadable file: warned about once per file per
    process, and added to the set `skipped` when one is given. The one rule every reader of many
    images follows (datasets, infer.py --image_dir, eval_captioning.py): skip, count, go on."""
    try:
        return transform(load_rgb(path))
    except UnreadableImage as e:
        if skipped is not None:
            skipped.add(path)
        if path not in _warned_paths:
            _warned_paths.add(path)
            warnings.warn(f"skipping unreadable image {path}: {e.reason}", stacklevel=2)
        return None


def collate_skip_none(batch):
    """default_collate over the readable items; None when every item of the batch was unreadable."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return default_collate(batch)


# ---------------------------------------------------------------------------------------------
# Shared pieces

def check_subset_ratio(subset_ratio):
    try:
        ratio = float(subset_ratio)
    except (TypeError, ValueError):
        ratio = float("nan")
    if not (0 < ratio <= 1):  # also catches NaN
        raise BadInput(f"--subset_ratio {subset_ratio} must be in (0, 1]; e.g. 0.1 keeps a tenth of the images")
    return ratio


def subset_indices(n, subset_ratio, seed):
    """Sorted indices of a random subset of range(n) that depends only on (n, ratio, seed), so every
    process of a multi-process run picks the same images."""
    ratio = check_subset_ratio(subset_ratio)
    if ratio == 1 or n == 0:
        return list(range(n))
    k = max(1, round(ratio * n))
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


class _ImageDataset(Dataset):
    """Loads and transforms one image per item; unreadable ones -> None, recorded and warned."""

    def __init__(self, image_size):
        if not isinstance(image_size, int) or image_size <= 0:
            raise BadInput(f"--image_size {image_size} must be a positive integer")
        self.image_size = image_size
        self.transform = image_transform(image_size)
        self.skipped_files = set()  # this process's unreadable files

    @property
    def num_skipped(self):
        """Unreadable files met so far by this process (0 in the main process when workers load)."""
        return len(self.skipped_files)

    def _pixels(self, path):
        return read_pixels(path, self.transform, self.skipped_files)

    def image_of(self, index):
        """The image id of item `index` (one item per image here; per caption in a caption set)."""
        return self.image_ids[index]


# ---------------------------------------------------------------------------------------------
# COCO captions (and the Karpathy split)

def _read_json(path, what):
    if not os.path.isfile(path):
        raise BadInput(f"{path} does not exist; {what}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not readable JSON ({e}); {what}")


def read_captions(ann_json, hint="pass a COCO captions file (images, annotations with image_id and caption)"):
    """A COCO captions file, read with pycocotools -> (images, captions): {image_id: image entry}
    in file order (every extra field kept: the toy world's "scene" and "heldout") and
    {image_id: [caption, ...]} ([] for an image without captions). The one reader of the format."""
    from pycocotools.coco import COCO

    if not os.path.isfile(ann_json):
        raise BadInput(f"{ann_json} does not exist; {hint}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            coco = COCO(ann_json)
        entries = coco.dataset.get("images")
        if not entries:
            raise BadInput(f"{ann_json}: no \"images\" entries; {hint}")
        images = {}
        for entry in entries:
            if not isinstance(entry, dict) or "id" not in entry:
                raise BadInput(f"{ann_json}: an image entry lacks \"id\" ({str(entry)[:100]}); {hint}")
            images[entry["id"]] = entry
        captions = {i: [a["caption"].strip() for a in coco.imgToAnns.get(i, []) if "caption" in a]
                    for i in images}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{ann_json}: not readable JSON ({type(e).__name__}: {e}); {hint}") from None
    except (AssertionError, KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"{ann_json}: not a COCO captions file ({type(e).__name__}: {e}); {hint}") from None
    return images, captions


def _read_coco_captions(data_dir, split):
    """-> ordered [(image_id, entry, [captions])], {image_id: [candidate paths]}."""
    ann = os.path.join(data_dir, "annotations", f"captions_{split}2017.json")
    hint = (f"pass --data_dir the COCO 2017 root (with annotations/captions_{split}2017.json) "
            f"and a --split it has (train, val)")
    images, captions = read_captions(ann, hint)
    for entry in images.values():
        if "file_name" not in entry:
            raise BadInput(f"{ann}: an image entry lacks \"file_name\" ({str(entry)[:100]}); "
                           f"regenerate the annotation file")
    records = [(image_id, entry, captions[image_id]) for image_id, entry in images.items()]
    image_dir = os.path.join(data_dir, f"{split}2017")
    paths = {image_id: [os.path.join(image_dir, entry["file_name"])] for image_id, entry, _ in records}
    return records, paths


def _read_karpathy(data_dir, split, karpathy_json):
    hint = "pass the Karpathy dataset_coco.json (images: [{filepath, filename, cocoid, split, sentences}])"
    if split not in KARPATHY_SPLITS:
        raise BadInput(f"--split {split} is not a Karpathy split; use one of {', '.join(KARPATHY_SPLITS)} "
                       f"(train includes restval)")
    data = _read_json(karpathy_json, hint)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BadInput(f"{karpathy_json}: no \"images\" list; {hint}")
    wanted = ("train", "restval") if split == "train" else (split,)
    records, paths = [], {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or not {"filename", "cocoid", "split"} <= entry.keys():
            raise BadInput(f"{karpathy_json}: an image entry lacks filename, cocoid or split "
                           f"({str(entry)[:100]}); {hint}")
        if entry["split"] not in wanted:
            continue
        image_id = int(entry["cocoid"])
        captions = [s["raw"].strip() for s in entry.get("sentences", []) if "raw" in s]
        info = {k: v for k, v in entry.items() if k != "sentences"}
        records.append((image_id, info, captions))
        # The Karpathy file names the COCO 2014 files; the same photos are in COCO 2017 by id.
        paths[image_id] = [os.path.join(data_dir, entry.get("filepath", ""), entry["filename"])] + [
            os.path.join(data_dir, f"{s}2017", f"{image_id:012d}.jpg") for s in ("train", "val")]
    if not records:
        raise BadInput(f"{karpathy_json}: no images in split {split}; {hint}")
    return records, paths


def check_data_format(data_format):
    if data_format not in DATA_FORMATS:
        raise BadInput(f"--data_format {data_format} is not known; use one of {', '.join(DATA_FORMATS)}")
    return data_format


def coco_root(data_dir, split):
    """(root, split, moved): data_dir itself when it has annotations/; when it is a split folder
    `<name>2017` without annotations/ whose parent has them (the VLV README's --data_dir
    data/coco2017/train2017), the parent and that folder's split, moved=True. The folder names the
    split, so it wins over --split (whose default, train, cannot be told from a choice)."""
    if os.path.isdir(os.path.join(data_dir, "annotations")):
        return data_dir, split, False
    folder = os.path.normpath(data_dir)
    parent = os.path.dirname(folder) or "."  # relative stays relative: paths in messages read as given
    m = _SPLIT_FOLDER.match(os.path.basename(folder))
    if m and os.path.isdir(os.path.join(parent, "annotations")):
        return parent, m.group(1), True
    return data_dir, split, False


class _CocoBase(_ImageDataset):
    def __init__(self, data_dir, split="train", image_size=384, subset_ratio=1.0, karpathy_json=None, seed=0,
                 data_format="coco"):
        super().__init__(image_size)
        check_subset_ratio(subset_ratio)  # before reading a large annotation file
        check_data_format(data_format)
        if not data_dir or not os.path.isdir(data_dir):
            where = ("the Flickr30k folder (with captions.txt or results_20130124.token and the images)"
                     if data_format == "flickr30k" else f"the COCO 2017 root (with annotations/ and {split}2017/)")
            raise BadInput(f"--data_dir {data_dir} does not exist; pass {where}")
        if data_format == "flickr30k":
            from data.flickr30k import read_flickr30k
            records, self._paths = read_flickr30k(data_dir, split, karpathy_json)
        else:
            root, folder_split, moved = coco_root(data_dir, split)
            if moved:
                # A Karpathy file keeps its own split; the folder only locates the root.
                if not karpathy_json:
                    split_note = f"split {folder_split}" + ("" if folder_split == split else f" (not --split {split})")
                else:
                    split_note = f"Karpathy split {split}"
                warnings.warn(f"--data_dir {data_dir} is a COCO split folder: reading the COCO root {root}, "
                              f"{split_note}", stacklevel=3)
                data_dir, split = root, (split if karpathy_json else folder_split)
            if karpathy_json:
                records, self._paths = _read_karpathy(data_dir, split, karpathy_json)
            else:
                records, self._paths = _read_coco_captions(data_dir, split)
        self.data_dir, self.split, self.data_format = data_dir, split, data_format
        # The subset is drawn over all images of the split, so the images-only and the caption
        # dataset with the same seed and ratio hold the same images (bar those without captions).
        keep = subset_indices(len(records), subset_ratio, seed)
        self._records = [records[i] for i in keep]
        # image_id -> the image entry with every extra field (toy world: "scene", "heldout").
        self.images_info = {image_id: entry for image_id, entry, _ in self._records}

    def image_path(self, image_id):
        """Where image_id's file is: the first candidate that exists (else the first, to report)."""
        candidates = self._paths[image_id]
        for path in candidates:
            if os.path.exists(path):
                return path
        return candidates[0]


class CocoImagesOnlyDataset(_CocoBase):
    """One item per image: {"pixel_values": [3,S,S] float in [0,1], "image_id": int, "index": int}."""

    def __init__(self, data_dir, split="train", image_size=384, subset_ratio=1.0, karpathy_json=None, seed=0,
                 data_format="coco"):
        super().__init__(data_dir, split, image_size, subset_ratio, karpathy_json, seed, data_format)
        self.image_ids = [image_id for image_id, _, _ in self._records]
        if not self.image_ids:
            raise BadInput(f"--data_dir {data_dir}: split {split} has no images")

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index):
        image_id = self.image_ids[index]
        pixels = self._pixels(self.image_path(image_id))
        if pixels is None:
            return None
        return {"pixel_values": pixels, "image_id": image_id, "index": index}


class CocoImageCaptionDataset(_CocoBase):
    """One item per caption: {"pixel_values", "caption": str, "image_id", "index"}.

    For evaluation: `image_ids` (images with at least one caption, in file order),
    `captions_by_image` {image_id: [captions]}, `images_info` {image_id: image entry}."""

    def __init__(self, data_dir, split="train", image_size=384, subset_ratio=1.0, karpathy_json=None, seed=0,
                 data_format="coco"):
        super().__init__(data_dir, split, image_size, subset_ratio, karpathy_json, seed, data_format)
        self.captions_by_image = {image_id: caps for image_id, _, caps in self._records if caps}
        self.image_ids = list(self.captions_by_image)
        # Grouped by image, in file order: items of one image are adjacent.
        self.items = [(image_id, c) for image_id, caps in self.captions_by_image.items() for c in caps]
        if not self.items:
            raise BadInput(f"--data_dir {data_dir}: split {split} has no captions"
                           + (f" (in the chosen subset of {len(self._records)} images)" if self._records else ""))

    def image_of(self, index):
        return self.items[index][0]

    def first_items(self):
        """{image_id: the index of its first caption item}, in file order: one item per image."""
        firsts = {}
        for index, (image_id, _) in enumerate(self.items):
            firsts.setdefault(image_id, index)
        return firsts

    def repeat_images(self, repeats):
        """repeats {image_id: k}: every caption of those images appears k times per epoch (k >= 1;
        images not named keep 1): repeat-factor sampling, as LVIS does for rare categories, but
        fixed in the item list, so the seeded shuffle and an exact resume stay what they are."""
        self.items = [item for item in self.items for _ in range(repeats.get(item[0], 1))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image_id, caption = self.items[index]
        pixels = self._pixels(self.image_path(image_id))
        if pixels is None:
            return None
        return {"pixel_values": pixels, "caption": caption, "image_id": image_id, "index": index}


# ---------------------------------------------------------------------------------------------
# Any folder of images

def list_images(folder):
    """Image files under folder, recursively, sorted; hidden files and folders (., e.g. macOS ._x.jpg
    resource forks, .ipynb_checkpoints) left out."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


class ImageFolderDataset(_ImageDataset):
    """Every image under folder: {"pixel_values": [3,S,S], "image_id": index, "index": index}."""

    def __init__(self, folder, image_size=384, subset_ratio=1.0, seed=0):
        super().__init__(image_size)
        check_subset_ratio(subset_ratio)
        if not folder or not os.path.isdir(folder):
            raise BadInput(f"--data_dir {folder} does not exist; pass a folder of images")
        files = list_images(folder)
        if not files:
            raise BadInput(f"--data_dir {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched "
                           f"recursively); pass a folder of images or the COCO 2017 root")
        self.folder = folder
        self.files = [files[i] for i in subset_indices(len(files), subset_ratio, seed)]
        self.image_ids = list(range(len(self.files)))

    def image_path(self, index):
        return self.files[index]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        pixels = self._pixels(self.files[index])
        if pixels is None:
            return None
        return {"pixel_values": pixels, "image_id": index, "index": index}


def make_images_dataset(data_dir, split="train", image_size=384, subset_ratio=1.0, karpathy_json=None, seed=0,
                        data_format="coco"):
    """COCO images when data_dir has annotations/ (or is a split folder of a COCO root, or a
    Karpathy file is given), Flickr30k's with data_format="flickr30k", else a folder."""
    if check_data_format(data_format) == "flickr30k":
        return CocoImagesOnlyDataset(data_dir, split, image_size, subset_ratio, karpathy_json, seed, data_format)
    if not data_dir or not os.path.isdir(data_dir):
        raise BadInput(f"--data_dir {data_dir} does not exist; pass the COCO 2017 root (with annotations/ and "
                       f"{split}2017/) or a folder of images")
    check_subset_ratio(subset_ratio)
    if karpathy_json or os.path.isdir(os.path.join(data_dir, "annotations")) or coco_root(data_dir, split)[2]:
        return CocoImagesOnlyDataset(data_dir, split, image_size, subset_ratio, karpathy_json, seed, data_format)
    return ImageFolderDataset(data_dir, image_size, subset_ratio, seed)
