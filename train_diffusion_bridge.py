"""The diffusion bridge: a 1D-UNet DDPM on the SD text encoder's embeddings of the training captions,
which at inference carries a visual embedding cond(E(image)) into the text side (models/bridge.py).

The run extracts, once, T(caption) of every training caption and cond(z) of every training image
(cached in --output_dir/features.safetensors), takes each side's mean of L2-normalised vectors,
and trains the DDPM on the centred text side only. The checkpoints bridge_{step}.pt serve as
`--enhancer` of infer.py and eval_captioning.py, with a captioner trained on text alone
(train_stage2.py --text_only); --visualize draws what the bridge does to val images.

    python train_diffusion_bridge.py --preset toy --stage1_ckpt checkpoints/toy/stage1 \
        --output_dir checkpoints/toy/bridge
    python train_diffusion_bridge.py --stage1_ckpt checkpoints/stage1/vision_encoder_3000.pt \
        --data_dir data/coco2017 --output_dir checkpoints/bridge           # the paper's recipe
    python train_diffusion_bridge.py --visualize --ckpt checkpoints/toy/bridge --data_dir checkpoints/toy/data \
        --out bridge_effect.png
"""
import argparse
import os
import sys

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset
from models.bridge import LAYOUTS, LOSS_WEIGHTS, Bridge, default_config, modality_mean
from models.checkpointing import checkpoint_submodules

CKPT_PREFIX = "bridge"
CKPT_KIND = "bridge"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_feature_data_args(p)
    g = p.add_argument_group("embeddings")
    g.add_argument("--stage1_ckpt", default=None,
                   help="vision_encoder_{step}.pt from train_stage1.py, or its --output_dir (the newest there)")
    g.add_argument("--stage2_ckpt", default=None,
                   help="captioner_{step}.pt (or its run folder): the encoder stage 2 fine-tuned gives the visual side")
    g = p.add_argument_group("DDPM (the paper's recipe by default)")
    recipe = default_config(0, 0)
    g.add_argument("--layout", default=recipe["layout"], choices=LAYOUTS,
                   help="how an [L, D] embedding meets the 1D UNet: sequence (L channels of length D) or "
                        "token (each token a vector, 1 channel; the paper's CLIP layout)")
    g.add_argument("--scale", type=float, default=recipe["scale"], help="the norm of the centred vectors")
    g.add_argument("--unet_dim", type=int, default=recipe["unet_dim"], help="Unet1D's dim: its base width")
    g.add_argument("--dim_mults", default=",".join(map(str, recipe["dim_mults"])),
                   help="Unet1D's width multipliers per level, comma-separated")
    g.add_argument("--num_train_timesteps", type=int, default=recipe["num_train_timesteps"])
    g.add_argument("--loss_weight", default=recipe["loss_weight"], choices=LOSS_WEIGHTS,
                   help="snr: the x0 error weighted by SNR(t), as the paper (lucidrains' pred_x0 loss)")
    g = p.add_argument_group("the bridge (the run's report)")
    g.add_argument("--bridge_t0", type=int, default=600, help="the visual embedding is taken as x_t at t0 - 1")
    g.add_argument("--bridge_steps", type=int, default=5, help="DDIM steps (UNet calls) from t0 to x0")
    g = p.add_argument_group("--visualize: draw the bridge's effect on val images")
    g.add_argument("--visualize", action="store_true")
    g.add_argument("--ckpt", default=None, help="bridge_{step}.pt or its run folder (the newest)")
    g.add_argument("--out", default="bridge_effect.png")
    common.add_training_args(p)
    # The paper's trainer: batch 64, lr 8e-5 constant, EMA 0.995, 3M steps (model-300.pt = step 3M).
    p.set_defaults(batch_size=64, lr=8e-5, lr_scheduler="constant_with_warmup", lr_warmup_steps=0,
                   weight_decay=0.0, max_steps=3_000_000, checkpointing_steps=10_000, validation_steps=10_000,
                   use_ema=True, ema_decay=0.995, num_workers=0)
    return p


def parse_args(argv=None):
    parser = build_parser()
    if "--visualize" in (sys.argv[1:] if argv is None else argv):  # draws a trained bridge: writes no run
        next(a for a in parser._actions if a.dest == "output_dir").required = False
    args = common.parse_with_preset(parser, argv, stage="bridge")
    if args.data_dir is None:
        common.die("--data_dir is required: the COCO 2017 root with annotations/ and train2017/")
    common.check_bridge_flags(args.bridge_t0, args.bridge_steps, args.num_train_timesteps)
    if args.visualize:
        if not args.ckpt:
            common.die("--visualize draws a trained bridge: pass --ckpt bridge_{step}.pt (or its run folder)")
        args.ckpt = common.resolve_checkpoint(args.ckpt, CKPT_PREFIX)
        return args
    if not args.stage1_ckpt:
        common.die("--stage1_ckpt is required: the visual side is cond(z) of its encoder")
    try:
        args.dim_mults = [int(m) for m in args.dim_mults.split(",")]
    except ValueError:
        common.die(f"--dim_mults {args.dim_mults!r}: give integers, comma-separated (e.g. 1,2,4,8)")
    args.stage1_ckpt = common.resolve_checkpoint(args.stage1_ckpt, "vision_encoder")
    if args.stage2_ckpt:
        args.stage2_ckpt = common.resolve_checkpoint(args.stage2_ckpt, "captioner")
    return args


def side_features(args, encoder, sd, info, image_size, split, limit, device):
    """{"cond" [N,L,D], "text" [M,L,D], "text_image" [M] (row of cond)} of one split's images and
    their captions; the train split's cached in --output_dir/features.safetensors."""
    ratio = args.subset_ratio if split == args.split else 1.0
    dataset = CocoImageCaptionDataset(args.data_dir, split=split, image_size=image_size, subset_ratio=ratio,
                                      karpathy_json=args.karpathy_json, seed=args.seed, data_format=args.data_format)
    image_ids = dataset.image_ids[:limit]

    def compute():
        feats = common.embed_images(encoder, sd, dataset, image_ids, image_size, args.feature_batch_size,
                                    device=device, cond=True, desc=f"embedding {split} images")
        rows = [(row, c) for row, p in enumerate(feats["position"].tolist())
                for c in dataset.captions_by_image[image_ids[p]]]
        return dict(cond=feats["cond"], text_image=torch.tensor([r for r, _ in rows]),
                    text=common.embed_texts(sd, [c for _, c in rows], args.feature_batch_size))

    if split != args.split:  # the val pairs are few: extracted afresh
        return compute()
    settings = dict(encoder=info["encoder_fingerprint"], text_encoder=common.text_encoder_fingerprint(sd),
                    split=split, image_size=image_size, subset_ratio=ratio, karpathy_json=args.karpathy_json,
                    seed=args.seed, data_format=args.data_format)
    return common.cached_features(common.features_cache(args), settings, compute)


def cosine(a, b):
    """Per-row cosine of [N,L,D] tensors as flat vectors -> [N]."""
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def paired_report(bridge, val, t0, steps):
    """Mean cos(visual, its captions' text) in the centred text space: before (each side centred
    by its own mean), after the bridge."""
    rows, text = val["text_image"], bridge.centre(val["text"], "text")  # each image bridged once
    before = cosine(bridge.bridge(val["cond"], t0, 0)[rows], text).mean().item()
    after = cosine(bridge.bridge(val["cond"], t0, steps)[rows], text).mean().item()
    return before, after


def main(argv=None):
    args = parse_args(argv)
    if args.visualize:
        return visualize(args)
    accelerator, _ = common.setup_run(args, "vlv_bridge")
    device = accelerator.device
    encoder, sd, _, info = common.load_encoder(args.stage1_ckpt, args.stage2_ckpt, device)
    encoder.eval().requires_grad_(False)
    image_size = args.image_size or info["stage1_image_size"]

    feats = side_features(args, encoder, sd, info, image_size, args.split, None, device)
    val = None
    if args.val_split != "none":
        val = side_features(args, encoder, sd, info, image_size, args.val_split, args.num_val_images, device)
    text_encoder = common.text_encoder_fingerprint(sd)
    seq_len, dim = feats["text"].shape[1:]
    del encoder, sd  # the DDPM trains on the cached text embeddings only
    recipe = default_config(seq_len, dim, layout=args.layout, scale=args.scale, unet_dim=args.unet_dim,
                            dim_mults=args.dim_mults, num_train_timesteps=args.num_train_timesteps,
                            loss_weight=args.loss_weight)
    if dim % 2 ** (len(args.dim_mults) - 1):
        common.die(f"--dim_mults {args.dim_mults}: the UNet halves the embedding width {dim} "
                   f"{len(args.dim_mults) - 1} times; pass fewer levels")
    bridge = Bridge(recipe, modality_mean(feats["text"], args.layout),
                    modality_mean(feats["cond"], args.layout)).to(device)
    if args.gradient_checkpointing:  # Unet1D has no switch of its own: its residual blocks and attention
        from denoising_diffusion_pytorch.denoising_diffusion_pytorch_1d import ResnetBlock, Residual
        checkpoint_submodules(bridge.unet, lambda m: isinstance(m, (ResnetBlock, Residual)))
    text = bridge.centre(feats["text"].to(device), "text")  # [M,L,D] at norm scale: the training set
    val = {k: v.to(device) for k, v in val.items()} if val else None
    # What inference needs to rebuild and check the bridge.
    config = dict(bridge=recipe, **info, image_size=image_size, text_encoder_fingerprint=text_encoder)
    if accelerator.is_main_process:
        common.save_json(os.path.join(args.output_dir, "config.json"), config)
    common.print_main(accelerator, f"bridge: {text.shape[0]} training captions of [{seq_len}, {dim}] "
                                   f"({args.layout} layout); Unet1D {sum(p.numel() for p in bridge.unet.parameters()) / 1e6:.2f}M "
                                   f"parameters")

    loader = common.train_loader(common.IndexDataset(text.shape[0]), args, accelerator)
    optimizer, lr_scheduler, steps_per_epoch, max_steps = common.build_optimization(
        accelerator, args, bridge.unet.parameters(), loader)
    model, optimizer, lr_scheduler = accelerator.prepare(bridge, optimizer, lr_scheduler)
    trainer = common.Trainer(
        accelerator=accelerator, args=args, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
        loader=loader, steps_per_epoch=steps_per_epoch, max_steps=max_steps, kind=CKPT_KIND,
        prefix=CKPT_PREFIX, config=config, model_state=bridge.state_dict, load_model_state=bridge.load_state_dict,
        free_on_resume={"val_split", "num_val_images", "feature_batch_size", "bridge_t0", "bridge_steps",
                        "visualize", "ckpt", "out"})
    common.resume(trainer, args)

    def compute_loss(batch):
        return model(text[batch["index"].to(device)])

    def validate(step):
        if val is not None:
            before, after = paired_report(bridge, val, args.bridge_t0, args.bridge_steps)
            print(f"step {step}: cos(visual, its captions' text) on {args.val_split}, centred: each side's own "
                  f"mean {before:.4f}, bridged (t0 {args.bridge_t0}, {args.bridge_steps} steps) {after:.4f}",
                  flush=True)

    trainer.train(compute_loss, validate, args.validation_steps, desc="bridge")
    common.finish_run(trainer)
    return trainer.step


# ---------------------------------------------------------------------------------------------
# --visualize: the seed's diffusion_effect.png

def effect(bridge, cond, text, text_image, t0, steps):
    """What the bridge does to val pairs. cond [N,L,D] raw visual, text [M,L,D] raw captions'
    embeddings, text_image [M] the image of each caption. Returns the per-pair cosines before
    (each side centred by its own mean) and after, the norms of cond(z) and of the bridge's x0
    (before its output's normalisation), and top-1 caption retrieval before and after."""
    from models.bridge import normalize
    captions = bridge.centre(text, "text")
    before = bridge.bridge(cond, t0, 0)
    x0 = bridge.denoise(bridge.centre(cond, "visual"), t0, steps, unit=False)
    after = normalize(x0, bridge.layout)
    flat = lambda v: torch.nn.functional.normalize(v.flatten(1), dim=1)  # noqa: E731
    top_before = (flat(before) @ flat(captions).T).argmax(1)  # [N]: the nearest caption
    top_after = (flat(after) @ flat(captions).T).argmax(1)
    right = lambda top: text_image[top] == torch.arange(len(cond))  # noqa: E731
    changed = top_before != top_after
    share = lambda m: m.float().mean().item()  # noqa: E731
    return dict(pairs=dict(before=cosine(before[text_image], captions), after=cosine(after[text_image], captions)),
                norms=dict(before=cond.flatten(1).norm(dim=1), after=x0.flatten(1).norm(dim=1)),
                changed=share(changed), changed_to_right=share(changed & right(top_after)),
                changed_from_right=share(changed & right(top_before)),
                right_before=share(right(top_before)), right_after=share(right(top_after)))


def visualize(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ckpt = common.load_checkpoint(args.ckpt, CKPT_KIND)
    config = ckpt["config"]
    stage1 = args.stage1_ckpt or config["stage1_ckpt"]
    stage2 = args.stage2_ckpt or config["stage2_ckpt"]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the embeddings; the drawing's sums run on the CPU
    encoder, sd, _, info = common.load_encoder(stage1, stage2, device)
    common.check_bridge(config, args.ckpt, info["encoder_fingerprint"], common.text_encoder_fingerprint(sd))
    bridge = common.bridge_of(ckpt)
    feats = side_features(args, encoder.eval(), sd, info, config["image_size"], args.val_split, args.num_val_images,
                          device)
    text = feats["text"]
    e = effect(bridge, feats["cond"], text, feats["text_image"], args.bridge_t0, args.bridge_steps)

    def bins(*arrays):  # 40 shared bins, wide enough for values that are (nearly) all equal
        lo, hi = min(a.min() for a in arrays), max(a.max() for a in arrays)
        pad = max(hi - lo, 1e-3 * max(1.0, abs(hi))) * 0.02
        return np.linspace(lo - pad, hi + pad, 41)

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    before, after = e["pairs"]["before"].numpy(), e["pairs"]["after"].numpy()
    ax[0, 0].hist(before, bins=bins(before, after), alpha=0.6, label=f"centred (mean {before.mean():.3f})",
                  color="tab:blue")
    ax[0, 0].hist(after, bins=bins(before, after), alpha=0.6, label=f"bridged (mean {after.mean():.3f})", color="tab:red")
    ax[0, 0].set(title="cos(visual, its captions' text embedding)", xlabel="cosine", ylabel="pairs")
    ax[0, 0].legend()
    norms = e["norms"]["before"].numpy(), e["norms"]["after"].numpy()
    ax[0, 1].hist(norms[0], bins=bins(*norms), alpha=0.6, label="cond(z), raw", color="tab:blue")
    ax[0, 1].hist(norms[1], bins=bins(*norms), alpha=0.6, label="bridge x0 (before normalize)",
                  color="tab:red")
    ax[0, 1].set(title="norms", xlabel="L2 norm of the [L, D] embedding", ylabel="images")
    ax[0, 1].legend()
    bars = {"top-1 right\nbefore": e["right_before"], "top-1 right\nafter": e["right_after"],
            "changed": e["changed"], "changed\nto right": e["changed_to_right"],
            "changed\nfrom right": e["changed_from_right"]}
    ax[1, 0].bar(list(bars), list(bars.values()), color=["tab:blue", "tab:red", "grey", "tab:green", "tab:orange"])
    ax[1, 0].set(title=f"caption retrieval among {len(text)} val captions", ylabel="share of images", ylim=(0, 1))
    lim = (min(before.min(), after.min()), max(before.max(), after.max()))
    ax[1, 1].scatter(before, after, s=4, alpha=0.5)
    ax[1, 1].plot(lim, lim, "k--", lw=1)
    ax[1, 1].set(title="per pair: before vs after", xlabel="cos before", ylabel="cos after")
    fig.suptitle(f"{os.path.basename(args.ckpt)}: t0 {args.bridge_t0}, {args.bridge_steps} DDIM steps, "
                 f"{len(feats['cond'])} {args.val_split} images")
    fig.tight_layout()
    with common.atomic_path(args.out, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    print(f"cos(visual, text) {before.mean():.4f} -> {after.mean():.4f}; top-1 right {e['right_before']:.3f} -> "
          f"{e['right_after']:.3f} (changed {e['changed']:.3f}: to right {e['changed_to_right']:.3f}, from right "
          f"{e['changed_from_right']:.3f}); wrote {args.out}")
    return e


if __name__ == "__main__":
    errors.run(main)
