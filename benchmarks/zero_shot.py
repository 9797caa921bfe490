"""Zero-shot captioning: a captioner trained on text alone reads val images through each way of
closing the modality gap (toy world).

Rows (RUN/zero_shot/<captioner> from scripts/zero_shot.sh; RUN/bridge, RUN/flow_v2t): none; each
side's own mean removed (C3); CapDec noise in training; both; a ridge map and a visual2text flow
fitted on paired train data; the diffusion bridge (5 DDIM steps from t0 600, and the seed's
600-step reading); the paired stage-2 captioner as the limit. Cells: the share of seen and
held-out val images whose caption names every attribute right, BLEU-4 and CIDEr-D
(pycocoevalcap), the mean cos(captioner's input, its captions' text embeddings in the same space),
and the gap-closing step's time per image. Literature's shape on COCO (CIDEr): none 13.0, CapDec
91.8, C3 93.3, bridge 96.4. Goal: the bridge beats every row but the paired limit and reaches 0.9
of its seen all-right.

    bash scripts/zero_shot.sh                                  # trains what the rows need, prints the table
    python -m benchmarks.zero_shot --run checkpoints/toy       # the table alone
    python -m benchmarks.zero_shot --run checkpoints/toy --noise_std raw|center   # CapDec's std (one number)
"""
import argparse
import os
import sys
import time

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset, image_transform, load_rgb

# key: (row, captioner: RUN/zero_shot/<name> or RUN/stage2, enhancer, the bridge's steps)
ROWS = {
    "none": ("none", "text_raw", "none", None),
    "c3": ("mean shift (C3)", "text_centre", "bridge", 0),
    "capdec": ("noise injection (CapDec)", "text_raw_noise", "none", None),
    "c3_noise": ("mean shift + noise (C3)", "text_centre_noise", "bridge", 0),
    "ridge": ("ridge map (paired train data)", "text_raw", "ridge", None),
    "flow": ("flow visual2text (8 Euler steps)", "text_raw", "flow", None),
    "bridge_noaug": ("bridge, captioner without its augmentation", "text_centre", "bridge", 5),
    "bridge": ("bridge (t0 {t0}, 5 DDIM steps)", "text_bridge", "bridge", 5),
    "bridge_600": ("bridge, {t0} steps from t0 {t0} (the seed's reading)", "text_bridge", "bridge", "t0"),
    "paired": ("paired stage-2 captioner (the limit)", "stage2", "none", None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy", help="the toy pipeline's output folder")
    p.add_argument("--num_samples", type=int, default=None, help="first N val images (default: all)")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--bridge_t0", type=int, default=600, help="the bridge rows' t0 (the paper: 600)")
    p.add_argument("--rows", default=",".join(ROWS), help="the rows, by key (comma-separated)")
    p.add_argument("--noise_std", choices=["raw", "center"], default=None,
                   help="print CapDec's --text_noise_std for this text space and exit: s with "
                        "1 / sqrt(1 + s^2) = the mean cos(visual, text) of the bridge's paired train features")
    return p.parse_args(argv)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def noise_std(run, space):
    """CapDec's noise for a text space, from the measured gap on paired train data."""
    from safetensors.torch import load_file
    feats = load_file(os.path.join(run, "bridge", "features.safetensors"))
    visual, text = feats["cond"][feats["text_image"]], feats["text"]
    if space == "center":
        bridge = common.bridge_of(common.load_checkpoint(common.resolve_checkpoint(
            os.path.join(run, "bridge"), "bridge"), "bridge"))
        visual, text = bridge.centre(visual, "visual"), bridge.centre(text, "text")
    c = cosine(visual, text).mean().item()
    print(f"mean cos(visual, text) on {len(text)} paired train captions ({space}): {c:.4f}", file=sys.stderr)
    return (1 / c ** 2 - 1) ** 0.5


def main(argv=None):
    from eval_captioning import attribute_accuracy, score_captions
    args = parse_args(argv)
    if args.noise_std:
        print(f"{noise_std(args.run, args.noise_std):.4f}")
        return None
    path = lambda *p: os.path.join(args.run, *p)  # noqa: E731
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        common.die(f"--rows {','.join(sorted(unknown))}: unknown; the rows are {', '.join(ROWS)}")
    rows = [(k, *ROWS[k]) for k in args.rows.split(",")]
    for _, _, captioner, enhancer, _ in rows:
        folder = path("stage2") if captioner == "stage2" else path("zero_shot", captioner)
        if not os.path.isdir(folder):
            common.die(f"no captioner at {folder}; run scripts/zero_shot.sh first (OUT={args.run})")
    torch.manual_seed(0)
    dataset = CocoImageCaptionDataset(path("data"), split="val", image_size=32)
    ids = dataset.image_ids[:args.num_samples]
    refs = {i: dataset.captions_by_image[i] for i in ids}
    image_of = torch.tensor([k for k, i in enumerate(ids) for _ in refs[i]])  # the image of each reference
    vlvs, images_at, results = {}, {}, []
    raw_texts = None  # [M,L,D] T(caption) of the references: every row's models share stage 1's SD
    for key, name, captioner, enhancer, steps in rows:
        name, steps = name.format(t0=args.bridge_t0), args.bridge_t0 if steps == "t0" else steps
        stage2 = path("stage2") if captioner == "stage2" else path("zero_shot", captioner)
        if stage2 not in vlvs:
            vlvs[stage2] = common.load_vlv(path("stage1"), stage2)
        vlv = vlvs[stage2]
        spec = {"none": "none", "bridge": path("bridge"), "ridge": path("flow_v2t", "baseline.pt"),
                "flow": path("flow_v2t")}[enhancer]
        common.load_enhancer(common.enhancer_flags(spec, bridge_t0=args.bridge_t0, bridge_steps=steps or 0), vlv)
        if vlv.image_size not in images_at:  # the val images, read once per size
            transform = image_transform(vlv.image_size)
            images_at[vlv.image_size] = torch.stack([transform(load_rgb(dataset.image_path(i))) for i in ids])
        if raw_texts is None:
            raw_texts = common.embed_texts(vlv.sd, [c for i in ids for c in refs[i]])
        texts = raw_texts
        if vlv.text_space and vlv.text_space["norm"] == "center":  # the captioner's own space
            texts = vlv.enhancer.bridge.centre(raw_texts, "text")
        preds, cos, seconds = {}, [], 0.0
        for s in range(0, len(ids), args.batch_size):
            batch = ids[s:s + args.batch_size]
            images = images_at[vlv.image_size][s:s + len(batch)]
            with torch.no_grad():
                start = time.perf_counter()
                prefix = vlv.prefix(images)
                seconds += time.perf_counter() - start
                captions = vlv.captioner.generate(prefix, num_beams=args.num_beams)
            preds.update(zip(batch, captions))
            rows_here = (image_of >= s) & (image_of < s + len(batch))
            cos.append(cosine(prefix[image_of[rows_here] - s], texts[rows_here]))
        groups = attribute_accuracy(preds, dataset.images_info)
        scores = score_captions(preds, refs, ["bleu", "cider"])
        result = dict(key=key, name=name, seen=groups["seen"]["all"]["accuracy"],
                      heldout=groups.get("heldout", {}).get("all", {}).get("accuracy", float("nan")),
                      bleu4=scores["BLEU-4"], cider=scores["CIDEr-D"], cos=torch.cat(cos).mean().item(),
                      ms=1000 * seconds / len(ids))
        results.append(result)
        print(f"{name}: seen {result['seen']:.3f}, held-out {result['heldout']:.3f}, CIDEr-D {result['cider']:.3f}, "
              f"cos {result['cos']:.3f}", file=sys.stderr, flush=True)
    print(common.machine_description())
    n_seen = sum(not dataset.images_info[i].get("heldout") for i in ids)
    print(f"{len(ids)} toy val images ({n_seen} seen, {len(ids) - n_seen} held-out), beam {args.num_beams}; "
          f"ms/image: encoder + the gap-closing step (the captioner not counted)")
    print(common.markdown_table(
        ["way of closing the gap", "seen all-right", "held-out all-right", "BLEU-4", "CIDEr-D",
         "cos to paired text", "ms/image"],
        [[r["name"], f"{r['seen']:.3f}", f"{r['heldout']:.3f}", f"{r['bleu4']:.3f}", f"{r['cider']:.3f}",
          f"{r['cos']:.3f}", f"{r['ms']:.2f}"] for r in results]))
    by = {r["key"]: r for r in results}
    bridge, paired = by.get("bridge"), by.get("paired")
    if bridge and paired:
        others = [r for r in results if not r["key"].startswith(("bridge", "paired"))]
        beaten = [r["name"] for r in others if r["seen"] >= bridge["seen"]]
        print(f"\ngoal: the bridge beats every row but the paired limit on seen all-right: "
              f"{'yes' if not beaten else 'no, not ' + '; '.join(beaten)}; "
              f"{bridge['seen'] / max(paired['seen'], 1e-9):.2f} of the paired captioner's (goal 0.90)")
    return results


if __name__ == "__main__":
    errors.run(main)
