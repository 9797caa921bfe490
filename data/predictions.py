"""Prediction files: {image_id, caption} records, as a JSON list (COCO results format) or JSONL;
and feature files: tensors of named images in safetensors.

infer.py and eval_captioning.py append the captions they make to a JSONL file a batch at a time,
each batch flushed and fsync'ed, so a killed run loses at most the batch it was making and a
re-run captions only what is missing (run_predictions). infer.py --save_features writes each
batch's tensors as a part file and merges them at the end (run_features), with the same promise.
"""
import json
import os
import sys

from errors import BadInput


def read_predictions(path):
    """{image_id: caption} in file order, from a JSON list (COCO results) or JSONL."""
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            records = [(f"record {n}", rec) for n, rec in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}: not valid JSON ({e}); give a COCO results list or JSONL") from None
    else:
        records = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError:
                raise BadInput(f"{path}: line {n} is not JSON; fix or delete that line") from None
    preds = {}
    for where, rec in records:
        if not isinstance(rec, dict) or "image_id" not in rec or "caption" not in rec:
            raise BadInput(f"{path}: {where} is not an object with \"image_id\" and \"caption\": {str(rec)[:80]}")
        if not isinstance(rec["caption"], str):
            raise BadInput(f"{path}: {where}: the caption of image {rec['image_id']!r} is not a string")
        if rec["image_id"] in preds:
            raise BadInput(f"{path}: {where}: image {rec['image_id']!r} has a second prediction; keep one per image")
        preds[rec["image_id"]] = rec["caption"]
    return preds


def _repair_tail(path):
    """Cut a torn (unterminated, unparsable) last line a killed run left; end the file with a newline."""
    with open(path, "rb+") as f:
        raw = f.read()
        cut = raw.rfind(b"\n") + 1
        tail = raw[cut:]
        if not tail.strip():
            return
        try:
            json.loads(tail)
            f.write(b"\n")  # a complete record that only lacks its newline: keep it
        except ValueError:  # JSONDecodeError, or a multi-byte character cut in half
            f.truncate(cut)
            print(f"{path}: ignored a torn last line (a killed run); that image is captioned again",
                  file=sys.stderr)


def check_settings(out_path, settings):
    """A resumable output remembers what made it (`out_path.settings.json`): a re-run with other
    settings (another checkpoint, enhancer, decoding) would mix two models' outputs in one file,
    so it is refused. settings: a JSON-able dict, or None to skip the check."""
    if settings is None:
        return
    from data.files import save_json
    path = out_path + ".settings.json"
    settings = json.loads(json.dumps(settings, default=str))
    started = os.path.exists(out_path) or os.path.exists(out_path + ".parts")  # run_features' parts
    if started and os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            k = changed[0]
            raise BadInput(f"{out_path} was made with {k}={before.get(k)!r}, this run has {settings.get(k)!r}; "
                           f"pass another output path, or delete it to start over")
    save_json(path, settings)


def _load(items):
    """A batch of items -> (their image_ids, their [3,H,W] tensors, how many were unreadable)."""
    ids, images = [], []
    for item in items:
        pixels = item["pixel_values"]
        pixels = pixels() if callable(pixels) else pixels
        if pixels is not None:
            ids.append(item["image_id"])
            images.append(pixels)
    return ids, images, len(items) - len(ids)


def run_predictions(caption_fn, dataset_items, out_jsonl, batch_size, settings=None):
    """Caption every item not yet in out_jsonl; returns {image_id: caption} for all items done.

    dataset_items: a sequence of {"image_id", "pixel_values"} where pixel_values is a [3,H,W]
    tensor or a callable returning one (or None for an unreadable image, which is skipped), so a
    resumed run does not even load the images it already captioned. caption_fn(list of [3,H,W]
    tensors) -> list[str]. Each batch is appended and fsync'ed as soon as it is made.
    settings: what made the captions (check_settings).
    """
    from tqdm.auto import tqdm
    os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
    check_settings(out_jsonl, settings)
    done = {}
    if os.path.exists(out_jsonl):
        _repair_tail(out_jsonl)
        done = read_predictions(out_jsonl)
    todo = [item for item in dataset_items if item["image_id"] not in done]
    if done:
        print(f"{out_jsonl}: {len(dataset_items) - len(todo)} images already captioned; "
              f"{len(todo)} to go", file=sys.stderr)
    skipped = 0
    with open(out_jsonl, "a") as out:
        for start in tqdm(range(0, len(todo), batch_size), desc="captioning", disable=not todo):
            ids, images, unreadable = _load(todo[start:start + batch_size])
            skipped += unreadable
            if not images:
                continue
            captions = caption_fn(images)
            if len(captions) != len(images):
                raise RuntimeError(f"caption_fn returned {len(captions)} captions for {len(images)} images")
            for image_id, caption in zip(ids, captions):
                out.write(json.dumps({"image_id": image_id, "caption": caption}) + "\n")
                done[image_id] = caption
            out.flush()
            os.fsync(out.fileno())
    if skipped:
        print(f"skipped {skipped} unreadable images", file=sys.stderr)
    return {item["image_id"]: done[item["image_id"]] for item in dataset_items if item["image_id"] in done}


# ---------------------------------------------------------------------------------------------
# Feature files: tensors of a folder of images, by name, in safetensors

def _names_of(path):
    import json

    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("names", "[]"))


def read_features(path):
    """A feature file -> (names [N], {key: tensor [N, ...]})."""
    from safetensors.torch import load_file
    return _names_of(path), load_file(path)


def _write_features(path, names, tensors):
    import json

    from safetensors.torch import save_file

    from data.files import atomic_path
    with atomic_path(path, ".tmp.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"names": json.dumps(names)})


def run_features(feature_fn, dataset_items, out_path, batch_size, settings=None):
    """Like run_predictions, for tensors: feature_fn(list of [3,H,W]) -> {key: [B, ...]} for every
    item not yet done. Each batch is written at once, atomically, as a part file in
    `out_path.parts/`; at the end the parts (and an earlier out_path) become out_path, with the
    names in its metadata, in item order, and the parts are removed. A killed run resumes from its
    parts and computes each image once. settings: check_settings. Returns the number of images."""
    import shutil

    import torch
    from tqdm.auto import tqdm
    parts_dir = out_path + ".parts"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    check_settings(out_path, settings)
    os.makedirs(parts_dir, exist_ok=True)
    done = {}   # name -> (file, row)
    sources = [out_path] if os.path.exists(out_path) else []
    sources += [os.path.join(parts_dir, p) for p in sorted(os.listdir(parts_dir)) if p.endswith(".safetensors")]
    for source in sources:
        for row, name in enumerate(_names_of(source)):
            done.setdefault(name, (source, row))
    todo = [item for item in dataset_items if item["image_id"] not in done]
    if done:
        print(f"{out_path}: {len(dataset_items) - len(todo)} images already done; {len(todo)} to go", file=sys.stderr)
    part = len(sources)
    skipped = 0
    for start in tqdm(range(0, len(todo), batch_size), desc="features", disable=not todo):
        names, images, unreadable = _load(todo[start:start + batch_size])
        skipped += unreadable
        if not images:
            continue
        tensors = {k: v.detach().float().cpu() for k, v in feature_fn(images).items()}
        path = os.path.join(parts_dir, f"part_{part:06d}.safetensors")
        _write_features(path, names, tensors)
        part += 1
        for row, name in enumerate(names):
            done[name] = (path, row)
    if skipped:
        print(f"skipped {skipped} unreadable images", file=sys.stderr)
    order = [item["image_id"] for item in dataset_items if item["image_id"] in done]
    in_order = set(order)
    order += [name for name in done if name not in in_order]  # kept from an earlier run's file
    loaded = {}
    for path, _ in done.values():
        if path not in loaded:
            loaded[path] = read_features(path)[1]
    keys = sorted(next(iter(loaded.values()))) if loaded else []
    for path, tensors in loaded.items():
        if sorted(tensors) != keys:
            raise BadInput(f"{path} holds {', '.join(sorted(tensors))}, other parts {', '.join(keys)}: written "
                           f"with other settings (e.g. --enhancer); delete it or pass another --save_features")
    merged = {k: torch.stack([loaded[done[n][0]][k][done[n][1]] for n in order]) for k in keys}
    if merged:
        _write_features(out_path, order, merged)
    shutil.rmtree(parts_dir)
    return len(order)
