"""Caption images with a trained VLV, and regenerate them from the caption or from z.

    python infer.py --image_path img.jpg --stage1_ckpt .../vision_encoder_600.pt --stage2_ckpt .../captioner_600.pt
    python infer.py --image_dir photos/ --stage1_ckpt ... --stage2_ckpt ... --out_jsonl captions.jsonl
    python infer.py --image_path img.jpg ... --regen_image --out_image regen.png --recon_image --out_recon recon.png
"""
import argparse
import os
import sys
from functools import partial

import torch

import common
from data.coco import IMAGE_EXTENSIONS, UnreadableImage, image_transform, list_images, load_rgb
from eval_captioning import run_predictions
from models.vlv import load_vlv

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image_path", help="one image: its caption is printed")
    src.add_argument("--image_dir", help="a folder: captions go to --out_jsonl, in batches")
    p.add_argument("--stage1_ckpt", required=True)
    p.add_argument("--stage2_ckpt", required=True)
    p.add_argument("--out_jsonl", default="captions.jsonl")
    p.add_argument("--batch_size", type=int, default=16)
    g = p.add_argument_group("decoding")
    g.add_argument("--num_beams", type=int, default=5)
    g.add_argument("--length_penalty", type=float, default=1.0)
    g.add_argument("--max_new_tokens", type=int, default=30)
    g.add_argument("--min_new_tokens", type=int, default=0)
    g.add_argument("--no_repeat_ngram_size", type=int, default=0)
    g.add_argument("--do_sample", action="store_true")
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=1.0)
    g = p.add_argument_group("regeneration (single image)")
    g.add_argument("--regen_image", action="store_true", help="draw the image again from its caption")
    g.add_argument("--out_image", default="regenerated.png")
    g.add_argument("--recon_image", action="store_true", help="draw the image again straight from z")
    g.add_argument("--out_recon", default="reconstructed.png")
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=2.0)
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def decoding_kwargs(args):
    return dict(num_beams=args.num_beams, length_penalty=args.length_penalty,
                max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                no_repeat_ngram_size=args.no_repeat_ngram_size, do_sample=args.do_sample,
                top_p=args.top_p, temperature=args.temperature)


def read_image(path, transform):
    try:
        return transform(load_rgb(path))
    except UnreadableImage as e:
        common.die(f"{e}; pass a JPEG/PNG/WebP file")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.do_sample:
        torch.manual_seed(args.seed)
    vlv = load_vlv(args.stage1_ckpt, args.stage2_ckpt, args.device)
    transform = image_transform(vlv.image_size)
    gen = decoding_kwargs(args)

    if args.image_path:
        images = read_image(args.image_path, transform).unsqueeze(0).to(args.device)
        caption = vlv.caption(images, **gen)[0]
        print(caption)
        for wanted, out, captions in ((args.regen_image, args.out_image, [caption]),
                                      (args.recon_image, args.out_recon, None)):
            if wanted:
                image = vlv.regenerate(images, captions, args.num_inference_steps, args.guidance_scale, args.seed)
                common.save_grid(out, image, nrow=1)
                print(f"wrote {out}", file=sys.stderr)
        return [caption]

    if not os.path.isdir(args.image_dir):
        common.die(f"--image_dir {args.image_dir} does not exist")
    files = list_images(args.image_dir)
    if not files:
        common.die(f"--image_dir {args.image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def loader(path):
        try:
            return transform(load_rgb(path))
        except UnreadableImage as e:
            print(f"warning: skipped {e}", file=sys.stderr)
            return None

    # Records are {"image_id": path relative to --image_dir, "caption"}; appended as made, so a
    # killed run resumes where it stopped.
    items = [{"image_id": os.path.relpath(f, args.image_dir), "pixel_values": partial(loader, f)}
             for f in files]
    captions = run_predictions(lambda images: vlv.caption(torch.stack(images).to(args.device), **gen),
                               items, args.out_jsonl, args.batch_size)
    print(f"{len(captions)} captions in {args.out_jsonl}", file=sys.stderr)
    return captions

if __name__ == "__main__":
    main()
