"""Reference scoring of `train_stage2.py --caption_loss best_ref|posterior_ref`: every reference of
an image scored after one shared run of its prefix (the KV cache reused by all its captions)
against one copy of the prefix per caption; same scores, same picks, one run.

    python -m benchmarks.reference_scoring --stage1_ckpt checkpoints/toy/stage1 \
        --stage2_ckpt checkpoints/toy/stage2 --data_dir checkpoints/toy/data
"""
import argparse
import time

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset
from models.emb_to_caption import best_in_group, flatten_references


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1_ckpt", required=True, help="vision_encoder_{step}.pt, or the stage-1 run's folder")
    p.add_argument("--stage2_ckpt", required=True, help="captioner_{step}.pt, or the stage-2 run's folder")
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--batch_size", type=int, default=32, help="images per batch (the toy stage-2 batch)")
    p.add_argument("--num_batches", type=int, default=10)
    args = p.parse_args(argv)
    if min(args.batch_size, args.num_batches) < 1:
        common.die("--batch_size and --num_batches must be 1 or more")

    vlv = common.load_vlv(args.stage1_ckpt, args.stage2_ckpt, "cpu")
    captioner = vlv.captioner.eval()
    data = CocoImageCaptionDataset(args.data_dir, split="train", image_size=vlv.image_size)
    first_item = data.first_items()  # one item per image: all its references are scored
    ids = data.image_ids
    if len(ids) < args.batch_size * args.num_batches:
        common.die(f"--data_dir {args.data_dir} has {len(ids)} train images, fewer than --batch_size "
                   f"{args.batch_size} x --num_batches {args.num_batches}; lower either")
    batches = []
    for b in range(args.num_batches):
        items = [data[first_item[i]] for i in ids[b * args.batch_size:(b + 1) * args.batch_size]]
        items = [x for x in items if x is not None]
        captions, groups = flatten_references([data.captions_by_image[int(x["image_id"])] for x in items])
        with torch.no_grad():
            prefix = vlv.prefix(torch.stack([x["pixel_values"] for x in items]))   # [B,L,D]
        batches.append((prefix, captions, groups))

    def score_all(shared):
        start, scores = time.perf_counter(), []
        with torch.no_grad():
            for prefix, captions, groups in batches:
                if shared:
                    nll = captioner.token_nll(prefix, captions, groups)[0]
                else:
                    nll = captioner.token_nll(prefix[groups], captions)[0]
                scores.append(nll.sum(1))
        return time.perf_counter() - start, scores

    score_all(shared=True)  # warm-up: first-call allocations and kernel selection
    t_copied, copied = score_all(shared=False)
    t_shared, shared = score_all(shared=True)
    same = sum(torch.equal(best_in_group(a, g), best_in_group(b, g))
               for a, b, (_, _, g) in zip(copied, shared, batches))
    diff = max((a - b).abs().max().item() for a, b in zip(copied, shared))
    n_refs = sum(len(c) for _, c, _ in batches)
    n = args.num_batches
    print(common.machine_description())
    print(f"{n} batches of {args.batch_size} toy train images, {n_refs} references, "
          f"prefix {batches[0][0].shape[1]} vectors")
    print(common.markdown_table(
        ["scoring every reference", "ms per batch", "same picks", "max score difference"],
        [["one copy of the prefix per reference", f"{1000 * t_copied / n:.0f}", "-", "-"],
         ["the prefix once per image, KV cache shared", f"{1000 * t_shared / n:.0f}", f"{same}/{n}", f"{diff:.1e}"]]))
    print(f"speed-up: {t_copied / t_shared:.1f}x")
    return dict(num_batches=n, num_references=n_refs, same_picks=same, max_difference=diff,
                seconds={"copied": t_copied, "shared": t_shared})


if __name__ == "__main__":
    errors.run(main)
