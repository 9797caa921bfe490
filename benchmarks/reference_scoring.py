"""Reference scoring of `train_stage2.py --caption_loss best_ref|posterior_ref`: every reference of
an image scored after one shared run of its prefix (the KV cache reused by all its captions)
against one copy of the prefix per caption; same scores, same picks, one run.

    python benchmarks/reference_scoring.py --stage1_ckpt checkpoints/toy/stage1/vision_encoder_800.pt \
        --stage2_ckpt checkpoints/toy/stage2/captioner_1400.pt --data_dir checkpoints/toy/data
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.coco import CocoImageCaptionDataset  # noqa: E402
from models.emb_to_caption import best_in_group, flatten_references  # noqa: E402
from models.vlv import load_vlv  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1_ckpt", required=True)
    p.add_argument("--stage2_ckpt", required=True)
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--batch_size", type=int, default=32, help="images per batch (the toy stage-2 batch)")
    p.add_argument("--num_batches", type=int, default=10)
    args = p.parse_args(argv)

    vlv = load_vlv(args.stage1_ckpt, args.stage2_ckpt, "cpu")
    captioner = vlv.captioner.eval()
    data = CocoImageCaptionDataset(args.data_dir, split="train", image_size=vlv.image_size)
    batches = []
    for b in range(args.num_batches):
        items = [data[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)]
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
    print(f"{args.num_batches} batches of {args.batch_size} toy train images, {n_refs} references, "
          f"prefix {batches[0][0].shape[1]} vectors, {torch.get_num_threads()} CPU threads")
    print("| scoring every reference | ms per batch | same picks | max score difference |")
    print("|---|---|---|---|")
    print(f"| one copy of the prefix per reference | {1000 * t_copied / args.num_batches:.0f} | - | - |")
    print(f"| the prefix once per image, KV cache shared | {1000 * t_shared / args.num_batches:.0f} | "
          f"{same}/{args.num_batches} | {diff:.1e} |")
    print(f"speed-up: {t_copied / t_shared:.1f}x")


if __name__ == "__main__":
    main()
