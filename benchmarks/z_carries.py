"""What z carries: the judge reads the attributes of toy val images regenerated from z, next to
images generated from the ground-truth caption's text embedding. VLV's claim is that the first
matches the second.

    python benchmarks/z_carries.py --stage1_ckpt checkpoints/toy/stage1/vision_encoder_600.pt \
        --data_dir checkpoints/toy/data --num_images 200
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.coco import CocoImageCaptionDataset  # noqa: E402
from data.judge import judge_accuracy  # noqa: E402
from models.vlv import load_stage1  # noqa: E402


def to_uint8(images):
    return [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in images.float().cpu()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1_ckpt", required=True)
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--split", default="val")
    p.add_argument("--num_images", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    encoder, sd, config, _ = load_stage1(args.stage1_ckpt, "cpu")
    encoder.eval()
    data = CocoImageCaptionDataset(args.data_dir, split=args.split, image_size=config["image_size"])
    ids = data.image_ids[:args.num_images]
    first_item = {}  # image_id -> index of its first caption item
    for i, (image_id, _) in enumerate(data.items):
        first_item.setdefault(image_id, i)
    rows = {"original image": [], "from z (stage 1)": [], "from the caption": []}
    scenes, heldout = [], []
    with torch.no_grad():
        for start in range(0, len(ids), args.batch_size):
            batch = [data[first_item[i]] for i in ids[start:start + args.batch_size]]
            images = torch.stack([b["pixel_values"] for b in batch])
            captions = [data.captions_by_image[b["image_id"]][0] for b in batch]
            gen = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       seed=args.seed + start)
            rows["original image"] += to_uint8(images)
            rows["from z (stage 1)"] += to_uint8(sd.generate(sd.condition(encoder(images)), **gen))
            rows["from the caption"] += to_uint8(sd.generate(sd.embed_text(captions), **gen))
            for b in batch:
                info = data.images_info[b["image_id"]]
                scenes.append(info["scene"])
                heldout.append(bool(info.get("heldout")))

    print(f"judge's attribute accuracy, {len(ids)} {args.split} images, "
          f"{args.num_inference_steps} DDIM steps, guidance {args.guidance_scale}")
    print("| source | split | n | colour | shape | size | position | relation | all |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, images in rows.items():
        for label, keep in (("seen", False), ("held-out", True)):
            idx = [i for i, h in enumerate(heldout) if h == keep]
            if not idx:
                continue
            acc = judge_accuracy([images[i] for i in idx], [scenes[i] for i in idx])
            cells = [f"{acc[k]:.3f}" if k in acc else "-" for k in
                     ("colour", "shape", "size", "position", "relation", "all")]
            print(f"| {name} | {label} | {len(idx)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
