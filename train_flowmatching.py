"""Flow matching on z: a feature enhancer (corrupted -> clean, visual -> text) or a prior over z.

The encoder's embeddings of the training images (and captions) are extracted once and cached in
--output_dir/features.safetensors (or --features_cache); the flow trains on them (models/flow.py). Modes, x0 -> x1:
  denoise      z + Gaussian noise (--noise_std times z's per-element std) -> z (the seed's recipe)
  degrade      z of a corrupted copy of the image (--degradations, one drawn per copy) -> z, and
               z -> z (--clean_copies)
  visual2text  cond(z) -> T(caption), the SD text encoder's embedding of one of its captions
  prior        N(0, I) -> z standardised per element (what the generator samples from)
Beside the flow, the run fits its closed-form baseline on the same pairs (a ridge map; for the
prior a Gaussian) into --output_dir/baseline.pt; both serve as `--enhancer` of infer.py and
eval_captioning.py.

    python train_flowmatching.py --preset toy --mode degrade --stage1_ckpt checkpoints/toy/stage1 \
        --stage2_ckpt checkpoints/toy/stage2 --output_dir checkpoints/toy/flow_degrade
    python train_flowmatching.py --stage1_ckpt checkpoints/stage1/vision_encoder_3000.pt --data_dir data/coco2017 \
        --mode denoise --width 768 --output_dir checkpoints/flow_denoise
(--stage2_ckpt: when stage 2 fine-tuned the encoder, the flow must learn the z its captioner reads)
"""
import argparse
import os

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset
from data.degrade import DEGRADATIONS, parse_degradations, random_degrade
from models.checkpointing import checkpoint_submodules
from models.emb_to_caption import flatten_references
from models.flow import SOLVERS, Block, Flow, GaussianPrior, RidgeMap

CKPT_PREFIX = "flow"
CKPT_KIND = "flow"
MODES = ("denoise", "degrade", "visual2text", "prior")
SPACE = {"denoise": "z", "degrade": "z", "visual2text": "cond", "prior": "z"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_feature_data_args(p)
    g = p.add_argument_group("pairs")
    g.add_argument("--mode", required=True, choices=MODES)
    g.add_argument("--stage1_ckpt", required=True,
                   help="vision_encoder_{step}.pt from train_stage1.py, or its --output_dir (the newest there)")
    g.add_argument("--stage2_ckpt", default=None,
                   help="captioner_{step}.pt (or its run folder): use the encoder stage 2 fine-tuned")
    g.add_argument("--noise_std", type=float, default=0.5,
                   help="denoise: the noise's std as a multiple of z's per-element std")
    g.add_argument("--degradations", default=",".join(DEGRADATIONS),
                   help=f"degrade: corruptions to draw from, comma-separated ({', '.join(DEGRADATIONS)})")
    g.add_argument("--degraded_copies", type=int, default=4,
                   help="degrade: corrupted copies of each training image (each a random kind and strength)")
    g.add_argument("--clean_copies", type=int, default=1,
                   help="degrade: clean -> clean pairs per training image, beside the corrupted copies: "
                        "they teach the flow to leave an uncorrupted z alone (0: corrupted pairs only)")
    g.add_argument("--ridge_alpha", type=float, default=1e-3,
                   help="the baseline's ridge penalty, relative to the mean diagonal of X^T X")
    g = p.add_argument_group("the captioner's loss on the end point (degrade, denoise; needs --stage2_ckpt)")
    g.add_argument("--caption_nll_weight", type=float, default=0.0,
                   help="add this times the frozen stage-2 captioner's NLL of each image's captions read off the "
                        "flow's end point (x0 carried to t = 1 with gradients): the flow is trained for what the "
                        "captioner reads of z, not for the squared error of every element alike (0: off)")
    g.add_argument("--caption_nll_steps", type=int, default=8,
                   help="Euler steps of that end point (infer's --enhancer_steps reads the flow with 8)")
    g = p.add_argument_group("velocity network")
    g.add_argument("--width", type=int, default=None, help="the flow's width (default: z's; else projected in and out)")
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--ode_steps", type=int, default=8, help="ODE steps of the run's own report")
    g.add_argument("--solver", default="euler", choices=SOLVERS)
    common.add_training_args(p)
    p.set_defaults(batch_size=256, lr=1e-3, lr_warmup_steps=100, num_workers=0)
    return p


def parse_args(argv=None):
    args = common.parse_with_preset(build_parser(), argv, stage="flow", variant="mode")
    if args.data_dir is None:
        common.die("--data_dir is required: the COCO 2017 root with annotations/ and train2017/")
    if args.mode == "degrade":
        parse_degradations(args.degradations)
        if args.degraded_copies < 1:
            common.die(f"--degraded_copies {args.degraded_copies}: must be at least 1")
        if args.clean_copies < 0:
            common.die(f"--clean_copies {args.clean_copies}: must be 0 or more")
    else:
        args.clean_copies = 0  # degrade's pairs only
    if args.caption_nll_weight:
        if args.mode not in ("degrade", "denoise"):
            common.die(f"--caption_nll_weight reads the flow's end point as z; --mode {args.mode} does not end in the "
                       f"captioner's z: use it with --mode degrade or denoise")
        if not args.stage2_ckpt:
            common.die("--caption_nll_weight needs the captioner that reads the flow's z: pass --stage2_ckpt")
        if args.caption_nll_steps < 1:
            common.die(f"--caption_nll_steps {args.caption_nll_steps}: must be at least 1")
    else:
        args.caption_nll_steps = None  # unused (and free on resume)
    if args.mode == "denoise" and args.noise_std <= 0:
        common.die(f"--noise_std {args.noise_std}: must be above 0")
    args.stage1_ckpt = common.resolve_checkpoint(args.stage1_ckpt, "vision_encoder")
    if args.stage2_ckpt:
        args.stage2_ckpt = common.resolve_checkpoint(args.stage2_ckpt, "captioner")
    return args


def dataset_ratio(args, split):
    return args.subset_ratio if split == args.split else 1.0  # --subset_ratio thins the training split only


def split_features(args, encoder, sd, info, image_size, split, limit, device):
    """The embeddings a mode's pairs are made of, for one split (cached for the train split), and
    the captions of each of their images."""
    dataset = CocoImageCaptionDataset(args.data_dir, split=split, image_size=image_size,
                                      subset_ratio=dataset_ratio(args, split),
                                      karpathy_json=args.karpathy_json, seed=args.seed, data_format=args.data_format)
    image_ids = dataset.image_ids[:limit]
    kinds = parse_degradations(args.degradations) if args.mode == "degrade" else None

    def degrade(image, copy, image_id):  # a fixed corrupted copy per (seed, copy, image)
        return random_degrade(image, kinds, (args.seed * 1_000_003 + copy) * 10_000_019 + image_id)[0]

    def compute():
        feats = common.embed_images(encoder, sd, dataset, image_ids, image_size, args.feature_batch_size,
                                    device=device, cond=args.mode == "visual2text",
                                    copies=args.degraded_copies if args.mode == "degrade" else 0,
                                    degrade=degrade, desc=f"embedding {split} images")
        if args.mode == "visual2text":  # every caption of every readable image, with its image's row
            rows = [(row, c) for row, p in enumerate(feats["position"].tolist())
                    for c in dataset.captions_by_image[image_ids[p]]]
            feats["text_image"] = torch.tensor([row for row, _ in rows])
            feats["text"] = common.embed_texts(sd, [c for _, c in rows], args.feature_batch_size)
        return feats

    settings = dict(encoder=info["encoder_fingerprint"], stage1=info["stage1_fingerprint"], split=split, limit=limit,
                    image_size=image_size, subset_ratio=dataset_ratio(args, split), mode=args.mode,
                    karpathy_json=args.karpathy_json, seed=args.seed, data_format=args.data_format,
                    degradations=args.degradations if kinds else None,
                    copies=args.degraded_copies if kinds else 0)
    if split != args.split:  # the val pairs are few: extracted afresh, not cached
        feats = compute()
    else:
        feats = common.cached_features(common.features_cache(args), settings, compute)
    return feats, [dataset.captions_by_image[image_ids[p]] for p in feats["position"].tolist()]


class Pairs:
    """(x0, x1) of a mode for item indices, in raw units, on `device`. Noise (denoise's x0, the
    prior's x0) comes from the global RNG, so a resumed run draws what an unbroken one draws."""

    def __init__(self, mode, feats, device, noise_std=0.0, z_std=None, clean_copies=0):
        self.mode, self.noise_std, self.z_std = mode, noise_std, z_std
        self.f = {k: v.to(device) for k, v in feats.items() if k != "position"}
        self.num_images = self.f["z"].shape[0]
        if mode == "degrade":  # every corrupted copy of every image, then clean_copies of z itself
            self.copies = self.f["z_degraded"].shape[0]
            self.size = (self.copies + clean_copies) * self.num_images
        elif mode == "visual2text":  # every caption
            self.size = self.f["text"].shape[0]
        else:
            self.size = self.num_images

    def __call__(self, idx):
        f = self.f
        if self.mode == "degrade":
            copy, image = idx // self.num_images, idx % self.num_images
            x1 = f["z"][image]
            x0 = f["z_degraded"][copy.clamp(max=self.copies - 1), image]
            return torch.where((copy < self.copies).view(-1, 1, 1), x0, x1), x1
        if self.mode == "visual2text":
            return f["cond"][f["text_image"][idx]], f["text"][idx]
        x1 = f["z"][idx]
        if self.mode == "denoise":
            return x1 + self.noise_std * self.z_std * torch.randn(x1.shape, device=x1.device), x1
        return torch.randn(x1.shape, device=x1.device), x1  # prior


def stats(x):
    """Per-element mean and std [L,D] of x [N,L,D] (std floored: constant elements stay finite)."""
    return x.mean(0), x.std(0).clamp(min=1e-6 * x.std().item() + 1e-12)


def fit_baseline(args, pairs, config):
    """The closed-form baseline on the training pairs, written to baseline.pt."""
    if args.mode == "prior":
        model, name = GaussianPrior.fit(pairs.f["z"].cpu()), "gaussian"
        config = {**config, "baseline_rank": model.factor.shape[1]}
    else:
        with torch.random.fork_rng():  # denoise: one fixed noisy copy per image
            torch.manual_seed(args.seed)
            x0, x1 = pairs(torch.arange(pairs.size, device=pairs.f["z"].device))
        model, name = RidgeMap.fit(x0.cpu(), x1.cpu(), args.ridge_alpha), "ridge"
    path = os.path.join(args.output_dir, "baseline.pt")
    common.save_checkpoint(path, dict(kind="flow_baseline", model=model.state_dict(),
                                      config={**config, "baseline": name}))
    return model


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()


def main(argv=None):
    args = parse_args(argv)
    accelerator, weight_dtype = common.setup_run(args, "vlv_flow")
    device = accelerator.device
    if args.caption_nll_weight:  # the captioner too, which the loss reads the flow's end point with
        vlv = common.load_vlv(args.stage1_ckpt, args.stage2_ckpt, device)
        encoder, sd, info = vlv.encoder, vlv.sd, vlv.info
    else:
        vlv = None
        encoder, sd, _, info = common.load_encoder(args.stage1_ckpt, args.stage2_ckpt, device)
    encoder.eval().requires_grad_(False)
    image_size = args.image_size or info["stage1_image_size"]

    feats, row_captions = split_features(args, encoder, sd, info, image_size, args.split, None, device)
    z_mean, z_std = stats(feats["z"])
    pairs = Pairs(args.mode, feats, device, args.noise_std, z_std.to(device), args.clean_copies)
    if args.mode == "visual2text":
        (source_mean, source_std), (target_mean, target_std) = stats(feats["cond"]), stats(feats["text"])
    elif args.mode == "prior":
        source_mean, source_std, target_mean, target_std = torch.zeros_like(z_mean), torch.ones_like(z_std), z_mean, z_std
    else:  # both ends in z's units: an untrained flow (zero velocity) is the identity
        source_mean, source_std, target_mean, target_std = z_mean, z_std, z_mean, z_std
    seq_len, dim = feats["z"].shape[1:]
    flow = Flow(dict(seq_len=seq_len, dim=dim, width=args.width, depth=args.depth, heads=args.heads),
                source_mean, source_std, target_mean, target_std).to(device)
    if args.gradient_checkpointing:
        checkpoint_submodules(flow.net, lambda m: isinstance(m, Block))
    # What inference needs to rebuild and check the flow.
    config = dict(mode=args.mode, space=SPACE[args.mode], net=flow.net.config, **info, image_size=image_size,
                  noise_std=args.noise_std if args.mode == "denoise" else None,
                  degradations=args.degradations if args.mode == "degrade" else None,
                  clean_copies=args.clean_copies if args.mode == "degrade" else None)
    if accelerator.is_main_process:
        common.save_json(os.path.join(args.output_dir, "config.json"), config)
        baseline = fit_baseline(args, pairs, config)
    val = None
    if args.val_split != "none":
        val_feats, _ = split_features(args, encoder, sd, info, image_size, args.val_split, args.num_val_images,
                                      device)
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            val = Pairs(args.mode, val_feats, device, args.noise_std, z_std.to(device))
            val = val(torch.arange(min(val.size, args.num_val_images), device=device))
    del encoder, sd  # the flow trains on the cached features only (and, with --caption_nll_weight, the captioner)
    if vlv:
        vlv.encoder = None
        vlv.requires_grad_(False)
    common.print_main(accelerator, f"{args.mode}: {pairs.size} training pairs of [{seq_len}, {dim}]; "
                                   f"flow {sum(p.numel() for p in flow.parameters()) / 1e6:.2f}M parameters")

    loader = common.train_loader(common.IndexDataset(pairs.size), args, accelerator)
    optimizer, lr_scheduler, steps_per_epoch, max_steps = common.build_optimization(
        accelerator, args, flow.parameters(), loader)
    model, optimizer, lr_scheduler = accelerator.prepare(flow, optimizer, lr_scheduler)
    trainer = common.Trainer(
        accelerator=accelerator, args=args, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
        loader=loader, steps_per_epoch=steps_per_epoch, max_steps=max_steps, kind=CKPT_KIND,
        prefix=CKPT_PREFIX, config=config, model_state=flow.state_dict, load_model_state=flow.load_state_dict,
        free_on_resume={"val_split", "num_val_images", "feature_batch_size", "ode_steps", "solver"})
    common.resume(trainer, args)

    def compute_loss(batch):
        index = batch["index"].to(device)
        x0, x1 = pairs(index)
        t = torch.rand(x0.shape[0], device=device)
        if vlv is None:
            return model(flow.to_source(x0), flow.to_target(x1), t)
        loss, end = model(flow.to_source(x0), flow.to_target(x1), t, endpoint_steps=args.caption_nll_steps)
        # The clean image's references, of which the one the captioner finds likeliest counts (its
        # own stage-2 pick, best_ref): a random one would pull z towards hedging between phrasings.
        captions, groups = flatten_references([row_captions[i] for i in (index % pairs.num_images).tolist()])
        nll = vlv.captioner(vlv.captioner_input(flow.from_target(end)), captions, groups, pick="best")
        return loss + args.caption_nll_weight * nll

    def validate(step):
        if val is None:
            return
        x0, x1 = val
        if args.mode == "prior":
            samples = flow.transport(torch.randn(x1.shape, device=device), 0.0, args.ode_steps, args.solver)
            gap = lambda s: ((s.mean(0) - x1.mean(0)).abs().mean() / x1.std(0).mean()).item()  # noqa: E731
            print(f"step {step}: |mean(samples) - mean(val z)| / std: flow {gap(samples):.3f}, "
                  f"gaussian {gap(baseline.sample(x1.shape[0]).to(device)):.3f}", flush=True)
            return
        flowed = flow.transport(x0, 0.0, args.ode_steps, args.solver)
        print(f"step {step}: cos(., x1) on {x0.shape[0]} {args.val_split} pairs: x0 {cosine(x0, x1):.4f}, "
              f"ridge {cosine(baseline(x0), x1):.4f}, flow ({args.ode_steps} {args.solver}) "
              f"{cosine(flowed, x1):.4f}", flush=True)

    trainer.train(compute_loss, validate, args.validation_steps, desc=f"flow {args.mode}")
    common.finish_run(trainer)
    return trainer.step


if __name__ == "__main__":
    errors.run(main)
