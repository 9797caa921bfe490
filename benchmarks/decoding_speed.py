"""Decoding speed: captions per second of the batched, KV-cached `generate` against a batch-1,
cache-free beam search (the EVCap / ClipCap style), same beams, same captions, one run.

    python benchmarks/decoding_speed.py --stage1_ckpt checkpoints/toy/stage1/vision_encoder_600.pt \
        --stage2_ckpt checkpoints/toy/stage2/captioner_600.pt --data_dir checkpoints/toy/data
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.coco import CocoImagesOnlyDataset  # noqa: E402
from models.vlv import load_vlv  # noqa: E402
from models.emb_to_caption import beam_search_reference  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1_ckpt", required=True)
    p.add_argument("--stage2_ckpt", required=True)
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=20)
    args = p.parse_args(argv)

    vlv = load_vlv(args.stage1_ckpt, args.stage2_ckpt, "cpu")
    data = CocoImagesOnlyDataset(args.data_dir, split="val", image_size=vlv.image_size)
    images = torch.stack([data[i]["pixel_values"] for i in range(min(args.num_images, len(data)))])
    with torch.no_grad():
        prefix = torch.cat([vlv.prefix(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size)])
    n = len(prefix)

    start = time.perf_counter()
    batched = []
    for i in range(0, n, args.batch_size):
        batched += vlv.captioner.generate(prefix[i:i + args.batch_size], num_beams=args.num_beams,
                                          max_new_tokens=args.max_new_tokens, length_penalty=1.0)
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    reference = []
    for i in range(n):
        reference += beam_search_reference(vlv.captioner, prefix[i:i + 1], args.num_beams, args.max_new_tokens)
    t_reference = time.perf_counter() - start

    same = sum(a == b for a, b in zip(batched, reference))
    print(f"{n} toy val images, {args.num_beams} beams, at most {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} CPU threads")
    print("| decoder | captions/s | same captions |")
    print("|---|---|---|")
    print(f"| batch-1 beam search, no KV cache (EVCap/ClipCap style) | {n / t_reference:.1f} | {same}/{n} |")
    print(f"| transformers generate, batch {args.batch_size}, KV cache | {n / t_batched:.1f} | {same}/{n} |")
    print(f"speed-up: {t_reference / t_batched:.1f}x")


if __name__ == "__main__":
    main()
