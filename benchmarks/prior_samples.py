"""Are the z a prior draws like real ones? (toy world) The flow prior against the Gaussian baseline
(the training z's mean and covariance) and against real z of val images (the limit).

Each z is captioned by the pipeline's stage 2 and drawn by the frozen SD (cond(z), guided); a z
counts as valid when its caption is a toy-world caption (1 or 2 objects, every attribute named)
and as consistent when data/judge.py reads the drawn image as the scene its caption says.

    python -m benchmarks.prior_samples --run checkpoints/toy        # RUN/flow_prior, stage1, stage2, data
"""
import argparse
import os

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset, image_transform, load_rgb
from data.judge import judge_image
from data.toy_world import attribute_scores, parse_caption
from models.flow import GaussianPrior


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy")
    p.add_argument("--prior", default=None, help="default: RUN/flow_prior")
    p.add_argument("--num_samples", type=int, default=200)
    p.add_argument("--ode_steps", type=int, default=16)
    p.add_argument("--solver", default="heun")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def valid(scene):
    objects = scene["objects"]
    named = all(o.get(k) for o in objects for k in ("colour", "shape", "size"))
    where = scene["position"] if len(objects) == 1 else scene["relation"]
    return len(objects) in (1, 2) and named and where is not None


def score(vlv, z, args):
    cond = vlv.sd.condition(z)
    prefix = cond if vlv.prefix_source == "cond" else z
    captions, images = [], []
    for s in range(0, len(z), 100):
        captions += vlv.captioner.generate(prefix[s:s + 100], num_beams=3)
        images += list(vlv.sd.generate(cond[s:s + 100], args.num_inference_steps, args.guidance_scale, args.seed))
    scenes = [parse_caption(c) for c in captions]
    ok = [valid(s) for s in scenes]
    consistent = [v and attribute_scores(judge_image(common.to_pil(im)), s)["all"]
                  for v, s, im in zip(ok, scenes, images)]
    return sum(ok) / len(ok), sum(consistent) / len(ok), captions[:3]


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    prior_dir = args.prior or os.path.join(args.run, "flow_prior")
    vlv = common.load_vlv(os.path.join(args.run, "stage1"), os.path.join(args.run, "stage2"))
    ckpt = common.load_checkpoint(common.resolve_checkpoint(prior_dir, "flow"), "flow")
    if ckpt["config"]["mode"] != "prior":
        common.die(f"{prior_dir} is a {ckpt['config']['mode']} flow; pass a flow of --mode prior")
    if ckpt["config"]["encoder_fingerprint"] != vlv.info["encoder_fingerprint"]:
        common.die(f"{prior_dir} was trained on the z of another encoder than {args.run}'s")
    flow = common.flow_of(ckpt)
    base = common.load_checkpoint(os.path.join(prior_dir, "baseline.pt"), "flow_baseline")
    net = ckpt["config"]["net"]
    gaussian = GaussianPrior(net["seq_len"], net["dim"], base["config"]["baseline_rank"])
    gaussian.load_state_dict(base["model"])
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num_samples, *flow.source_mean.shape, generator=generator)
    dataset = CocoImageCaptionDataset(os.path.join(args.run, "data"), split="val", image_size=vlv.image_size)
    transform = image_transform(vlv.image_size)
    real = torch.stack([transform(load_rgb(dataset.image_path(i))) for i in dataset.image_ids[:args.num_samples]])
    rows = []
    for name, z in (("flow prior", flow.transport(noise, 0.0, args.ode_steps, args.solver)),
                    ("Gaussian (mean, covariance)", gaussian.sample(args.num_samples, generator)),
                    ("real z of val images", vlv.encoder(real))):
        share_valid, share_consistent, examples = score(vlv, z, args)
        rows.append([name, len(z), f"{share_valid:.3f}", f"{share_consistent:.3f}", "; ".join(examples)])
    print(common.machine_description())
    print(f"prior: {args.ode_steps} {args.solver} steps; SD {args.num_inference_steps} steps, guidance "
          f"{args.guidance_scale}")
    print(common.markdown_table(["z from", "n", "valid caption", "image judged as its caption", "first captions"],
                                rows))
    return rows


if __name__ == "__main__":
    errors.run(main)
