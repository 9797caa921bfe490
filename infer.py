"""Caption images with a trained VLV, and regenerate them from the caption or from z.

    python infer.py --image_path img.jpg --stage1_ckpt checkpoints/toy/stage1 --stage2_ckpt checkpoints/toy/stage2
    python infer.py --image_dir photos/ --stage1_ckpt ... --stage2_ckpt ... --out_jsonl captions.jsonl
    python infer.py --image_path img.jpg ... --regen_image --out_image regen.png --recon_image --out_recon recon.png
    python infer.py --image_path img.jpg ... --enhancer checkpoints/toy/flow_degrade      # z enhanced first
    python infer.py --image_dir photos/ --stage1_ckpt ... --enhancer ... --save_features feats.safetensors
    python infer.py --generate --run_dir checkpoints/toy --seeds 0:100 --out_dir samples/   # seed -> image + caption
(--stage1_ckpt / --stage2_ckpt: a checkpoint file, or a run's --output_dir for its newest checkpoint)
--generate draws z from the prior (train_flowmatching.py --mode prior), then the image (SD) and the
caption (the captioner) from it: seed_XXX.png and metadata.json in --out_dir; a re-run resumes.
"""
import argparse
import os
import sys

import torch

import common
import errors
from data.coco import IMAGE_EXTENSIONS, image_transform, list_images, load_rgb, read_pixels
from data.predictions import run_predictions
from errors import UnreadableImage


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image_path", help="one image: its caption is printed")
    src.add_argument("--image_dir", help="a folder: captions go to --out_jsonl, in batches")
    src.add_argument("--generate", action="store_true", help="images and captions from seeds (the prior over z)")
    p.add_argument("--stage1_ckpt", default=None, help="vision_encoder_{step}.pt, or the stage-1 run's folder")
    p.add_argument("--stage2_ckpt", default=None,
                   help="captioner_{step}.pt, or the stage-2 run's folder (needed for captions)")
    p.add_argument("--out_jsonl", default="captions.jsonl")
    p.add_argument("--save_features", default=None,
                   help="with --image_dir: write z of each image (and the enhanced z or cond(z) with "
                        "--enhancer) to this safetensors file, by name, instead of captions; a re-run resumes")
    p.add_argument("--batch_size", type=int, default=16)
    common.add_decoding_args(p, num_beams=5)
    common.add_enhancer_args(p)
    g = p.add_argument_group("regeneration (single image)")
    g.add_argument("--regen_image", action="store_true", help="draw the image again from its caption")
    g.add_argument("--out_image", default="regenerated.png")
    g.add_argument("--recon_image", action="store_true", help="draw the image again straight from z")
    g.add_argument("--out_recon", default="reconstructed.png")
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=2.0)
    g.add_argument("--seed", type=int, default=0)
    g = common.add_generator_args(p.add_argument_group("generation (--generate)"), checkpoints=False)
    g.add_argument("--seeds", default="0:16", help="A:B (A..B-1), or a comma-separated list")
    g.add_argument("--out_dir", default="samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_seeds(text):
    """'A:B' -> A..B-1; 'a,b,c' -> those; 'a' -> [a]."""
    try:
        if ":" in text:
            start, stop = (int(x) for x in text.split(":"))
            seeds = list(range(start, stop))
        else:
            seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        common.die(f"--seeds {text!r}: give A:B (seeds A to B-1) or a comma-separated list of integers")
    if not seeds or min(seeds) < 0:
        common.die(f"--seeds {text!r}: give at least one seed, none below 0")
    return seeds


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.generate:
        args.seeds = parse_seeds(args.seeds)
        if args.do_sample:
            common.die("--generate decodes captions by beam search (a sampled caption would not follow from the "
                       "seed); leave out --do_sample")
        if not args.run_dir and not (args.stage1_ckpt and args.stage2_ckpt and args.prior):
            common.die("--generate needs --run_dir, or all three of --stage1_ckpt, --stage2_ckpt and --prior")
        return args
    if not args.stage1_ckpt:
        common.die("--stage1_ckpt is required: the vision encoder (vision_encoder_{step}.pt, or its run folder)")
    if args.save_features and not args.image_dir:
        common.die("--save_features writes the features of a folder: pass --image_dir")
    if not args.save_features and not args.stage2_ckpt:
        common.die("captions need --stage2_ckpt (the captioner); or pass --image_dir with --save_features "
                   "for features only")
    return args


def save_features(vlv, args, items):
    """--save_features: z of each image, and the enhancer's output in its space (z or cond)."""
    from data.predictions import run_features

    def features(images):
        images = torch.stack(images).to(args.device)
        out = {"z": vlv.encoder(images)}
        if vlv.enhancer is not None:
            z, cond = vlv.embed(images)
            out[f"{vlv.enhancer.space}_enhanced"] = z if vlv.enhancer.space == "z" else cond
        return out

    n = run_features(features, items, args.save_features, args.batch_size, common.output_settings(args, vlv, captions=False))
    print(f"features of {n} images in {args.save_features}", file=sys.stderr)
    return n


def generate(args):
    """--generate: seed_XXX.png + metadata.json in --out_dir (resumed: finished seeds are not redone)."""
    gen = common.load_generator(args.run_dir, args.stage1_ckpt, args.stage2_ckpt, args.prior, args.device,
                                ode_steps=args.ode_steps, solver=args.solver,
                                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                decoding=common.decoding_kwargs(args), batch_size=args.batch_size)
    results = gen.generate_batch(args.seeds, out_dir=args.out_dir)
    for _, caption, meta in results[:4]:
        print(f"seed {meta['seed']}: {caption}")
    print(f"{len(results)} images and captions in {args.out_dir} (metadata.json)", file=sys.stderr)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.generate:
        return generate(args)
    if args.do_sample:
        torch.manual_seed(args.seed)
    vlv = common.load_vlv(args.stage1_ckpt, args.stage2_ckpt, args.device)
    common.load_enhancer(args, vlv)
    transform = image_transform(vlv.image_size)
    decoding = common.decoding_kwargs(args)

    if args.image_path:
        try:
            images = transform(load_rgb(args.image_path)).unsqueeze(0).to(args.device)
        except UnreadableImage as e:
            common.die(f"{e}; pass a JPEG/PNG/WebP file")
        caption = vlv.caption(images, **decoding)[0]
        print(caption)
        for wanted, out, captions in ((args.regen_image, args.out_image, [caption]),
                                      (args.recon_image, args.out_recon, None)):
            if wanted:
                image = vlv.regenerate(images, captions, args.num_inference_steps, args.guidance_scale, args.seed)
                common.save_image(out, image[0])
                print(f"wrote {out}", file=sys.stderr)
        return [caption]

    if not os.path.isdir(args.image_dir):
        common.die(f"--image_dir {args.image_dir} does not exist")
    files = list_images(args.image_dir)
    if not files:
        common.die(f"--image_dir {args.image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    # Records are {"image_id": path relative to --image_dir, "caption"}; appended as made, so a
    # killed run resumes where it stopped. Unreadable files are warned about and skipped.
    items = [{"image_id": os.path.relpath(f, args.image_dir), "pixel_values": (lambda f=f: read_pixels(f, transform))}
             for f in files]
    if args.save_features:
        return save_features(vlv, args, items)
    captions = run_predictions(lambda images: vlv.caption(torch.stack(images).to(args.device), **decoding),
                               items, args.out_jsonl, args.batch_size, common.output_settings(args, vlv))
    print(f"{len(captions)} captions in {args.out_jsonl}", file=sys.stderr)
    return captions


if __name__ == "__main__":
    errors.run(main)
