"""How much of Gaussian noise on z does the denoise flow take back, against its ridge map? (toy world)

One denoise flow per noise level (train_flowmatching.py --mode denoise --noise_std S, into
RUN/flow_denoise_S; a run already there is reused, and the levels share one extraction of the
training z). On the seen val images, z gets the noise of each level (S times z's per-element
std, a fixed draw), and the table gives cos(., clean z) and the captions' seen all-right
accuracy of the noisy z, of the ridge map fitted on the flow's own pairs, and of the flow.

    python -m benchmarks.enhance_denoise --run checkpoints/toy                   # RUN/stage1, stage2, data
    python -m benchmarks.enhance_denoise --run checkpoints/toy --noise_stds 0.5 --max_steps 200
"""
import argparse
import contextlib
import os
import shlex
import sys

import torch
from safetensors.torch import load_file

import common
import errors
import train_flowmatching
from benchmarks.enhance_degrade import seen_all_right
from data.coco import CocoImageCaptionDataset, image_transform, load_rgb


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy", help="the toy pipeline's output folder")
    p.add_argument("--noise_stds", default="0.25,0.5,1.0", help="noise levels, comma-separated")
    p.add_argument("--max_steps", type=int, default=None, help="each flow's training steps (default: the toy preset's)")
    p.add_argument("--flow_args", default="", help="more train_flowmatching flags for every flow, e.g. '--width 128'")
    p.add_argument("--num_samples", type=int, default=None, help="first N val images (default: all)")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--enhancer_steps", type=int, default=8)
    p.add_argument("--num_beams", type=int, default=3)
    args = p.parse_args(argv)
    try:
        args.noise_stds = [float(s) for s in args.noise_stds.split(",")]
    except ValueError:
        common.die(f"--noise_stds {args.noise_stds!r}: give numbers, comma-separated (e.g. 0.25,0.5,1.0)")
    if not args.noise_stds or min(args.noise_stds) <= 0:
        common.die(f"--noise_stds {args.noise_stds}: every level must be above 0")
    return args


def train_flow(run, noise_std, max_steps, flow_args):
    """RUN/flow_denoise_S, trained (or resumed, which is instant when it is finished)."""
    out = os.path.join(run, f"flow_denoise_{noise_std:g}")
    argv = ["--preset", "toy", "--mode", "denoise", "--noise_std", str(noise_std), "--data_dir",
            os.path.join(run, "data"), "--stage1_ckpt", os.path.join(run, "stage1"), "--stage2_ckpt",
            os.path.join(run, "stage2"), "--output_dir", out, "--resume_from", "latest",
            "--features_cache", os.path.join(run, "flow_denoise_features.safetensors")]
    with contextlib.redirect_stdout(sys.stderr):  # its reports; stdout is the table
        train_flowmatching.main(argv + (["--max_steps", str(max_steps)] if max_steps else []) + shlex.split(flow_args))
    return out


def main(argv=None):
    args = parse_args(argv)
    for need in ("stage1", "stage2", "data"):
        if not os.path.isdir(os.path.join(args.run, need)):
            common.die(f"--run {args.run} has no {need}/; run scripts/toy_pipeline.sh first (OUT={args.run})")
    flow_dirs = {s: train_flow(args.run, s, args.max_steps, args.flow_args) for s in args.noise_stds}

    torch.manual_seed(0)
    vlv = common.load_vlv(os.path.join(args.run, "stage1"), os.path.join(args.run, "stage2"))
    dataset = CocoImageCaptionDataset(os.path.join(args.run, "data"), split="val", image_size=vlv.image_size)
    ids = [i for i in dataset.image_ids if dataset.images_info[i].get("scene")][:args.num_samples]
    infos = [dataset.images_info[i] for i in ids]
    transform = image_transform(vlv.image_size)
    images = torch.stack([transform(load_rgb(dataset.image_path(i))) for i in ids])
    batches = lambda x: [x[s:s + args.batch_size] for s in range(0, len(x), args.batch_size)]  # noqa: E731
    with torch.no_grad():
        z = torch.cat([vlv.encoder(b) for b in batches(images)])  # [N, L, D]
    # The noise's unit: z's per-element std over the training images, as train_flowmatching draws it.
    _, z_std = train_flowmatching.stats(load_file(os.path.join(args.run, "flow_denoise_features.safetensors"))["z"])

    def captions(zs):
        return [c for b in batches(zs) for c in vlv.captioner.generate(vlv.captioner_input(b), num_beams=args.num_beams)]

    def cos(a):
        return torch.nn.functional.cosine_similarity(a.flatten(1), z.flatten(1), dim=1).mean().item()

    rows = [["clean", "1.0000", "-", "-", f"{seen_all_right(captions(z), infos):.3f}", "-", "-"]]
    results = {}
    for s, flow_dir in flow_dirs.items():
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1234))
        noisy = z + s * z_std * noise
        outs = {"noisy": noisy}
        for name, spec in (("ridge", os.path.join(flow_dir, "baseline.pt")), ("flow", flow_dir)):
            enhancer = common.load_enhancer(common.enhancer_flags(spec, enhancer_steps=args.enhancer_steps), vlv)
            vlv.enhancer = None  # applied here, to the noisy z
            with torch.no_grad():
                outs[name] = torch.cat([enhancer(b) for b in batches(noisy)])
        results[s] = {n: (cos(x), seen_all_right(captions(x), infos)) for n, x in outs.items()}
        r = results[s]
        rows.append([f"noise {s:g} x std", *[f"{r[n][0]:.4f}" for n in outs], *[f"{r[n][1]:.3f}" for n in outs]])
        print(f"noise {s:g}: " + ", ".join(f"{n} cos {c:.4f} acc {a:.3f}" for n, (c, a) in r.items()),
              file=sys.stderr, flush=True)
    print(common.machine_description())
    print(f"z of {len(ids)} toy val images ({sum(not i['heldout'] for i in infos)} seen) plus Gaussian noise; "
          f"flow {args.enhancer_steps} Euler steps, one flow per level; captions beam {args.num_beams}")
    print(common.markdown_table(["z", "cos noisy", "cos ridge", "cos flow", "all-right noisy", "all-right ridge",
                                 "all-right flow"], rows))
    return results


if __name__ == "__main__":
    errors.run(main)
