"""Prediction files: {image_id, caption} records, as a JSON list (COCO results format) or JSONL.

infer.py and eval_captioning.py append the captions they make to a JSONL file a batch at a time,
each batch flushed and fsync'ed, so a killed run loses at most the batch it was making and a
re-run captions only what is missing (run_predictions).
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


def run_predictions(caption_fn, dataset_items, out_jsonl, batch_size):
    """Caption every item not yet in out_jsonl; returns {image_id: caption} for all items done.

    dataset_items: a sequence of {"image_id", "pixel_values"} where pixel_values is a [3,H,W]
    tensor or a callable returning one (or None for an unreadable image, which is skipped), so a
    resumed run does not even load the images it already captioned. caption_fn(list of [3,H,W]
    tensors) -> list[str]. Each batch is appended and fsync'ed as soon as it is made.
    """
    from tqdm.auto import tqdm
    os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
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
            ids, images = [], []
            for item in todo[start:start + batch_size]:
                pixels = item["pixel_values"]
                pixels = pixels() if callable(pixels) else pixels
                if pixels is None:
                    skipped += 1
                    continue
                ids.append(item["image_id"])
                images.append(pixels)
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
