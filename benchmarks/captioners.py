"""The captioner family side by side on the toy world: the prefix captioner, BLIP from the packaged
MiniLM and from random init, EVCap with its visual-name memory, with none, and with the retrieved
names also written into its prompt (--names_in_prompt), trained on the names its captions say
(--train_names caption, ViECap's recipe), that with counterfactual pairs (--name_swap), and that with the
encoder fine-tuned (--finetune_encoder, the memory re-keyed by it), all on the same
stage-1 encoder at the same budget (RUN/captioners/<row> from scripts/captioners.sh). Cells: the
share of seen and held-out val images whose caption gets every attribute right (data/judge), BLEU-4,
METEOR, CIDEr-D (pycocoevalcap), trainable parameters, the run's training s/step (summary.json) and
captions/s of batched beam search here.

    bash scripts/captioners.sh                              # trains the rows, prints the table
    python -m benchmarks.captioners --run checkpoints/toy   # the table alone
"""
import argparse
import json
import os
import sys
import time
from unittest import mock

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset, image_transform, load_rgb
from data.toy_world import folder_of, name_of, val_world

ROWS = {
    "prefix": "prefix (psi(z) -> toy LM)",
    "blip": "BLIP, MiniLM decoder",
    "blip_random": "BLIP, random-init decoder",
    "evcap": "EVCap, memory on",
    "evcap_empty": "EVCap, memory empty",
    "evcap_names": "EVCap, memory on, names in the prompt (ViECap)",
    "evcap_caption": "EVCap, names in the prompt, trained on its captions' names (ViECap)",
    "evcap_swap": "the same with counterfactual pairs (names swapped in prompt and caption)",
    "evcap_tuned": "the same, encoder fine-tuned (the memory re-keyed by it)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy", help="the toy pipeline's OUT (stage1, data, captioners/)")
    p.add_argument("--rows", default=None, help=f"comma-separated, of {', '.join(ROWS)} (default: all, or none "
                                                "when --row is given)")
    p.add_argument("--row", action="append", default=[], metavar="LABEL=FOLDER",
                   help="also read the stage-2 run in FOLDER (any captioner on RUN's stage 1), labelled LABEL")
    p.add_argument("--num_samples", type=int, default=None, help="the first N val images (default: all)")
    p.add_argument("--val_world", type=int, default=None,
                   help="N: read a fresh toy val split of N images (generated once into RUN/val_world_N, "
                        "another seed than the run's data) instead of RUN/data's 200: held-out cells finer than 1/69")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--true_names", action="store_true",
                   help="also read each EVCap row with every val image's true names instead of the retrieved ones "
                        "(the toy scene's): what a perfect memory would give")
    p.add_argument("--memory_regions", type=int, default=None,
                   help="EVCap rows: retrieve names by region views, this many split lines an axis (0: by the "
                        "whole image), not the checkpoint's setting")
    p.add_argument("--memory_topn", type=int, default=None, help="EVCap rows: retrieve this many names, not the "
                                                                 "number each was trained with")
    p.add_argument("--attributes", action="store_true",
                   help="also print each row's attributes right, by group (seen by number of objects, held-out)")
    return p.parse_args(argv)


def seconds_per_step(folder):
    """The run's training time per step, from summary.json (this invocation's epochs); nan for a run
    still training or stopped early, which has written no summary yet (its checkpoints still read)."""
    path = os.path.join(folder, "summary.json")
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        times = json.load(f)["epoch_seconds_and_steps"].values()
    seconds, steps = sum(t[0] for t in times), sum(t[1] for t in times)
    return seconds / steps if steps else float("nan")


def trainable_parameters(vlv, config):
    count = sum(p.numel() for p in vlv.captioner.parameters() if p.requires_grad)
    return count + (sum(p.numel() for p in vlv.encoder.parameters()) if config["finetune_encoder"] else 0)


def main(argv=None):
    from eval_captioning import attribute_accuracy, score_captions
    args = parse_args(argv)
    keys = (args.rows or ("" if args.row else ",".join(ROWS))).split(",")
    keys = [k for k in keys if k]
    unknown = set(keys) - set(ROWS)
    if unknown:
        common.die(f"--rows {','.join(sorted(unknown))}: unknown; the rows are {', '.join(ROWS)}")
    folders = {k: os.path.join(args.run, "captioners", k) for k in keys}
    labels = dict(ROWS)
    for row in args.row:
        label, sep, folder = row.partition("=")
        if not (sep and label and folder) or label in folders or label in ROWS:
            common.die(f"--row {row!r}: pass LABEL=FOLDER, with a label no other row has ({', '.join(ROWS)} are taken)")
        folders[label], labels[label] = folder, label
    for k, folder in folders.items():
        if not os.path.isdir(folder):
            common.die(f"no captioner at {folder}; run scripts/captioners.sh first (OUT={args.run})")
    data = os.path.join(args.run, "data") if args.val_world is None else val_world(args.run, args.val_world)
    dataset = CocoImageCaptionDataset(data, split="val", image_size=32)
    ids = dataset.image_ids[:args.num_samples]
    refs = {i: dataset.captions_by_image[i] for i in ids}
    results = []
    for key in folders:
        vlv = common.load_vlv(os.path.join(args.run, "stage1"), folders[key])
        config = common.load_checkpoint(common.resolve_checkpoint(folders[key], "captioner"), "stage2")["config"]
        transform = image_transform(vlv.image_size)
        images = torch.stack([transform(load_rgb(dataset.image_path(i))) for i in ids])
        evcap = vlv.captioner.kind == "evcap"
        if evcap and args.memory_topn:
            vlv.captioner.memory.topn = args.memory_topn
        if evcap and args.memory_regions is not None:
            vlv.captioner.memory.regions = args.memory_regions
        readings = [(key, labels[key], None)]
        if evcap and args.true_names:
            true_names = {i: list(dict.fromkeys(name_of(folder_of(o["colour"], o["shape"]))
                                                for o in dataset.images_info[i]["scene"]["objects"])) for i in ids}
            readings.append((key + "+true", labels[key] + ", true names", true_names))
        for name, label, names in readings:
            preds, seconds = {}, 0.0
            with torch.no_grad():
                vlv.caption(images[:2], num_beams=args.num_beams)  # warm-up: first-call allocations not timed
                for s in range(0, len(ids), args.batch_size):
                    batch, batch_images = ids[s:s + args.batch_size], images[s:s + args.batch_size]
                    start = time.perf_counter()
                    if names is None:
                        captions = vlv.caption(batch_images, num_beams=args.num_beams)
                    else:  # the memory's answer replaced by the scene's names, for this batch
                        with mock.patch.object(vlv.captioner.memory, "retrieve", lambda z: [names[i] for i in batch]), \
                                mock.patch.object(vlv.captioner.memory, "regions", 0):
                            captions = vlv.caption(batch_images, num_beams=args.num_beams)
                    seconds += time.perf_counter() - start
                    preds.update(zip(batch, captions))
            groups = attribute_accuracy(preds, dataset.images_info)
            scores = score_captions(preds, refs, ["bleu", "meteor", "cider"])
            result = dict(key=name, label=label, seen=groups["seen"]["all"]["accuracy"],
                          heldout=groups.get("heldout", {}).get("all", {}).get("accuracy", float("nan")),
                          bleu4=scores["BLEU-4"], meteor=scores["METEOR"], cider=scores["CIDEr-D"],
                          params=trainable_parameters(vlv, config), step=seconds_per_step(folders[key]),
                          per_second=len(ids) / seconds, groups=groups)
            results.append(result)
            print(f"{label}: seen {result['seen']:.3f}, held-out {result['heldout']:.3f}, "
                  f"CIDEr-D {result['cider']:.3f}", file=sys.stderr, flush=True)
    print(common.machine_description())
    n_seen = sum(not dataset.images_info[i].get("heldout") for i in ids)
    print(f"{len(ids)} toy val images ({n_seen} seen, {len(ids) - n_seen} held-out), beam {args.num_beams}, "
          f"batch {args.batch_size}")
    print(common.markdown_table(
        ["captioner", "seen all-right", "held-out all-right", "BLEU-4", "METEOR", "CIDEr-D", "trainable parameters",
         "training s/step", "captions/s"],
        [[r["label"], f"{r['seen']:.3f}", f"{r['heldout']:.3f}", f"{r['bleu4']:.3f}", f"{r['meteor']:.3f}",
          f"{r['cider']:.3f}", f"{r['params']:,}", f"{r['step']:.2f}", f"{r['per_second']:.1f}"] for r in results]))
    if args.attributes:
        for r in results:
            print(f"\n{r['label']}:\n\n" + common.accuracy_table(r["groups"], "attribute (from the caption)"))
    by = {r["key"]: r for r in results}
    lines = []
    if {"blip", "blip_random"} <= by.keys():
        lines.append(f"BLIP from MiniLM beats random init: {'yes' if by['blip']['seen'] > by['blip_random']['seen'] else 'no'} "
                     f"({by['blip']['seen']:.3f} vs {by['blip_random']['seen']:.3f} seen)")
    for k in ("blip", "evcap"):
        if k in by:
            lines.append(f"{ROWS[k]} >= 0.95 seen: {'yes' if by[k]['seen'] >= 0.95 else 'no'} ({by[k]['seen']:.3f})")
    for k in ("evcap", "evcap_names", "evcap_caption", "evcap_swap"):
        if k in by:
            lines.append(f"{ROWS[k]} >= 0.5 held-out: {'yes' if by[k]['heldout'] >= 0.5 else 'no'} "
                         f"({by[k]['heldout']:.3f})")
    if lines:
        print("\ngoals: " + "; ".join(lines))
    return results


if __name__ == "__main__":
    errors.run(main)
