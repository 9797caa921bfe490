"""Flickr30k captions, read into the (records, paths) pair the COCO readers give (data/coco.py), so
the COCO datasets take them with data_format="flickr30k".

Layouts read, in data_dir:
    captions.txt              Kaggle's copy: CSV with the header `image,caption` (quoted captions
                              may hold commas)
    results_20130124.token    the official file: `1000092795.jpg#0<TAB>caption`
    images                    in data_dir/flickr30k_images/, data_dir/Images/ or data_dir/ itself
    --karpathy_json           dataset_flickr30k.json (images: [{filename, imgid, split, sentences:
                              [{raw}]}]): its captions and its train/val/test split; no caption file
                              needed then. split "train" = train + restval (Flickr's file has no
                              restval; COCO's does, and the two readers treat it alike).

image_id is the file's numeric stem (1000092795.jpg -> 1000092795), the same with and without the
Karpathy file. When any stem is not a number, every image is numbered by its order of first
appearance instead (1, 2, ...): mixing the two rules could give two images one id.
"""
import csv
import json
import os

from errors import BadInput

CAPTION_FILES = ("captions.txt", "results_20130124.token")
IMAGE_DIRS = ("flickr30k_images", "Images", "")
KARPATHY_SPLITS = ("train", "val", "test", "restval")


def _candidates(data_dir, file_name):
    return [os.path.join(data_dir, d, file_name) if d else os.path.join(data_dir, file_name)
            for d in IMAGE_DIRS]


def _image_ids(names):
    """{file name: image_id} for names in order of first appearance (see the module docstring)."""
    stems = [os.path.splitext(n)[0] for n in names]
    if all(s.isdigit() for s in stems):
        return {n: int(s) for n, s in zip(names, stems)}
    return {n: i + 1 for i, n in enumerate(names)}


def _read_lines(path):
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM some editors add
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not readable as UTF-8 text ({e}); pass the Flickr30k caption file as released")


def _read_captions_txt(path):
    """Kaggle's captions.txt -> [(file name, caption)]."""
    pairs = []
    for n, row in enumerate(csv.reader(_read_lines(path)), start=1):
        if not row or not "".join(row).strip():
            continue
        if n == 1 and [c.strip().lower() for c in row[:2]] == ["image", "caption"]:
            continue
        if len(row) < 2:
            raise BadInput(f"{path} line {n}: expected `image,caption`, got {','.join(row)[:80]!r}; "
                           f"pass Kaggle's Flickr30k captions.txt")
        # An unquoted caption with commas splits into more fields: they are all caption.
        pairs.append((row[0].strip(), ",".join(row[1:]).strip()))
    return pairs


def _read_token(path):
    """The official results_20130124.token -> [(file name, caption)]."""
    pairs = []
    for n, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            raise BadInput(f"{path} line {n}: expected `name.jpg#k<TAB>caption`, got {line[:80]!r}; "
                           f"pass the official Flickr30k results_20130124.token")
        pairs.append((key.rsplit("#", 1)[0].strip(), caption.strip()))
    return pairs


def _from_caption_file(data_dir, split):
    if split != "train":
        raise BadInput(f"--split {split}: Flickr30k's caption files have no val/test split; pass "
                       f"--karpathy_json dataset_flickr30k.json (Karpathy's split) for {split}, or --split train")
    for name, read in zip(CAPTION_FILES, (_read_captions_txt, _read_token)):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            break
    else:
        raise BadInput(f"{data_dir}: no Flickr30k caption file (looked for {' and '.join(CAPTION_FILES)}); "
                       f"pass --data_dir the Flickr30k folder, or --karpathy_json dataset_flickr30k.json")
    captions = {}  # file name -> [captions], in order of first appearance
    for file_name, caption in read(path):
        if file_name:
            captions.setdefault(file_name, [])
            if caption:
                captions[file_name].append(caption)
    if not captions:
        raise BadInput(f"{path}: no captions in it; pass the Flickr30k caption file as released")
    ids = _image_ids(list(captions))
    records = [(ids[n], {"id": ids[n], "file_name": n}, caps) for n, caps in captions.items()]
    return records


def _from_karpathy(split, karpathy_json):
    hint = "pass Karpathy's dataset_flickr30k.json (images: [{filename, imgid, split, sentences}])"
    if split not in KARPATHY_SPLITS:
        raise BadInput(f"--split {split} is not a Karpathy split; use one of {', '.join(KARPATHY_SPLITS)} "
                       f"(train includes restval)")
    if not os.path.isfile(karpathy_json):
        raise BadInput(f"{karpathy_json} does not exist; {hint}")
    try:
        with open(karpathy_json) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{karpathy_json}: not readable JSON ({e}); {hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BadInput(f"{karpathy_json}: no \"images\" list; {hint}")
    for entry in data["images"]:
        if not isinstance(entry, dict) or not {"filename", "split"} <= entry.keys():
            raise BadInput(f"{karpathy_json}: an image entry lacks filename or split ({str(entry)[:100]}); {hint}")
    # Ids over the whole file, not the split: an image keeps its id whichever split is read.
    ids = _image_ids(list(dict.fromkeys(e["filename"] for e in data["images"])))
    wanted = ("train", "restval") if split == "train" else (split,)
    records = []
    for entry in data["images"]:
        if entry["split"] not in wanted:
            continue
        image_id = ids[entry["filename"]]
        captions = [s["raw"].strip() for s in entry.get("sentences", []) if isinstance(s, dict) and s.get("raw")]
        info = {**{k: v for k, v in entry.items() if k != "sentences"}, "id": image_id, "file_name": entry["filename"]}
        records.append((image_id, info, captions))
    if not records:
        raise BadInput(f"{karpathy_json}: no images in split {split}; {hint}")
    return records


def read_flickr30k(data_dir, split="train", karpathy_json=None):
    """-> ordered [(image_id, entry, [captions])], {image_id: [candidate paths]}: what the COCO
    readers return. entry: {"id", "file_name"} (+ the Karpathy fields when its file is given)."""
    records = _from_karpathy(split, karpathy_json) if karpathy_json else _from_caption_file(data_dir, split)
    paths = {image_id: _candidates(data_dir, entry["file_name"]) for image_id, entry, _ in records}
    return records, paths
