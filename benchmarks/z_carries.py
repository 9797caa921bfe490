"""What z carries: the judge reads the attributes of toy val images regenerated from z, next to
images generated from the ground-truth caption's text embedding. VLV's claim is that the first
matches the second.

    python -m benchmarks.z_carries --stage1_ckpt checkpoints/toy/stage1 \
        --data_dir checkpoints/toy/data --num_images 200
"""
import argparse

import numpy as np
import torch

import common
import errors
from data.coco import CocoImageCaptionDataset
from data.judge import judge_image
from data.toy_world import attribute_scores, grouped_accuracy


def to_uint8(images):
    return [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in images.float().cpu()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1_ckpt", required=True, help="vision_encoder_{step}.pt, or the stage-1 run's folder")
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--split", default="val")
    p.add_argument("--num_images", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.num_images, args.batch_size, args.num_inference_steps) < 1:
        common.die("--num_images, --batch_size and --num_inference_steps must be 1 or more")

    encoder, sd, config, _ = common.load_stage1(args.stage1_ckpt, "cpu")
    encoder.eval()
    data = CocoImageCaptionDataset(args.data_dir, split=args.split, image_size=config["image_size"])
    ids = data.image_ids[:args.num_images]
    if any("scene" not in data.images_info[i] for i in ids):
        common.die(f"{args.data_dir}: not a toy world (its images have no scene); "
                   f"generate one with `python -m data.toy_world`")
    first_item = data.first_items()
    sources = {"original image": [], "from z (stage 1)": [], "from the caption": []}
    entries = []
    with torch.no_grad():
        for start in range(0, len(ids), args.batch_size):
            batch = [data[first_item[i]] for i in ids[start:start + args.batch_size]]
            batch = [b for b in batch if b is not None]  # unreadable images (the dataset warned)
            if not batch:
                continue
            images = torch.stack([b["pixel_values"] for b in batch])
            captions = [data.captions_by_image[b["image_id"]][0] for b in batch]
            gen = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       seed=args.seed + start)
            sources["original image"] += to_uint8(images)
            sources["from z (stage 1)"] += to_uint8(sd.generate(sd.condition(encoder(images)), **gen))
            sources["from the caption"] += to_uint8(sd.generate(sd.embed_text(captions), **gen))
            entries += [data.images_info[b["image_id"]] for b in batch]

    print(common.machine_description())
    print(f"judge's attribute accuracy, {len(entries)} {args.split} images, "
          f"{args.num_inference_steps} DDIM steps, guidance {args.guidance_scale}")
    results = {}
    for name, images in sources.items():
        scores = [attribute_scores(judge_image(img), e["scene"]) for img, e in zip(images, entries)]
        results[name] = grouped_accuracy(scores, entries)
        print(("\n" if len(results) > 1 else "") + common.accuracy_table(results[name], name), flush=True)
    return results


if __name__ == "__main__":
    errors.run(main)
