"""Stage 1: distil a frozen Stable Diffusion into the vision encoder E.

E maps an image to a caption embedding z; z conditions the frozen SD UNet, which must predict the
noise (or v) of the image's own latents. Only E trains.

    python train_stage1.py --preset toy --output_dir checkpoints/toy/stage1
    python train_stage1.py --data_dir data/coco2017 --sd_model_id stabilityai/stable-diffusion-2-1-base \
        --image_size 384 --batch_size 32 --lr 1e-4 --epochs 3 --output_dir checkpoints/stage1
    accelerate launch --num_processes 8 train_stage1.py ...   (or torchrun --nproc_per_node 8)
"""
import argparse
import os

import torch

import common
from models.checkpointing import enable_library_checkpointing
import errors
from data.coco import make_images_dataset
from models.frozen_sd21 import FrozenSD
from models.vision_to_textemb import VisionToTextEmb

CKPT_PREFIX = "vision_encoder"
CKPT_KIND = "stage1"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = common.add_data_args(p, "COCO 2017 root (annotations/, train2017/) or any folder of images", 384)
    g.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=False,
                   help="encode each image with the VAE once and reuse its latent distribution "
                        "(the same trajectory as encoding every step; memory: one latent per image)")
    g = p.add_argument_group("model")
    g.add_argument("--sd_model_id", default="stabilityai/stable-diffusion-2-1-base",
                   help="hub id, local diffusers folder, or HF-cache id with HF_HUB_OFFLINE=1")
    g.add_argument("--cond_mode", default="text_encoder", choices=["text_encoder", "direct"],
                   help="text_encoder: z goes through the frozen CLIP text encoder (the paper); "
                        "direct: z goes straight into cross-attention")
    g.add_argument("--backbone", default="resnet50", help="resnet50 | resnet18 | ... | toy")
    g.add_argument("--backbone_weights", default="imagenet", help="imagenet | none | PATH")
    g.add_argument("--encoder_width", type=int, default=None, help="query width (default: D)")
    g.add_argument("--encoder_layers", type=int, default=2)
    g = p.add_argument_group("reconstructions")
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=2.0)
    common.add_training_args(p)
    return p


def parse_args(argv=None):
    args = common.parse_with_preset(build_parser(), argv, stage="stage1")
    if args.data_dir is None:
        common.die("--data_dir is required: the COCO 2017 root or a folder of images "
                   "(or --preset toy after `python -m data.toy_world`)")
    return args


class LatentCache:
    """VAE posterior (mean, std) per dataset index, so each image is encoded once.

    Sampling from the cached posterior draws exactly what encoding afresh would draw, so a run
    with the cache follows the same trajectory as one without. (Assumes deterministic image
    transforms: stage 1 uses resize + centre crop, no random flips.)
    """

    def __init__(self):
        self.store = {}

    def latents(self, sd, images, indices):
        indices = indices.tolist()
        if any(i not in self.store for i in indices):
            # The whole batch, as without the cache: a batch of another size can round differently.
            mean, std = sd.latent_dist(images)
            for i, m, s in zip(indices, mean.cpu(), std.cpu()):
                self.store.setdefault(i, (m, s))
        mean = torch.stack([self.store[i][0] for i in indices]).to(images.device)
        std = torch.stack([self.store[i][1] for i in indices]).to(images.device)
        return sd.sample_latents(mean, std)


@torch.no_grad()
def save_reconstructions(path, encoder, sd, images, args):
    """A grid of rows original | reconstruction from z (classifier-free guided, seeded)."""
    recon = sd.generate(sd.condition(encoder(images)), num_inference_steps=args.num_inference_steps,
                        guidance_scale=args.guidance_scale, seed=args.seed)
    recon = torch.nn.functional.interpolate(recon.float().cpu(), size=images.shape[-2:],
                                            mode="bilinear", antialias=True)
    pairs = torch.stack([images.float().cpu(), recon], dim=1).flatten(0, 1)  # [2N,3,H,W]
    common.save_grid(path, pairs, ncol=2)


def main(argv=None):
    args = parse_args(argv)
    accelerator, weight_dtype = common.setup_run(args, "vlv_stage1")
    sd = FrozenSD.from_pretrained(args.sd_model_id, cond_mode=args.cond_mode, dtype=weight_dtype)
    sd.to(accelerator.device)
    if args.gradient_checkpointing:
        # The frozen UNet holds almost all of stage 1's activations (z's gradient flows back through it);
        # the text encoder's 77 tokens are a small part, and transformers would not checkpoint it in eval.
        enable_library_checkpointing(sd.unet)
    dataset = make_images_dataset(args.data_dir, args.split, args.image_size, args.subset_ratio,
                                  args.karpathy_json, args.seed, data_format=args.data_format)
    if len(dataset) < args.batch_size:
        common.die(f"--data_dir {args.data_dir} has {len(dataset)} images, fewer than --batch_size "
                   f"{args.batch_size}; lower --batch_size")
    encoder = VisionToTextEmb(sd.seq_len, sd.embed_dim, args.backbone, args.backbone_weights,
                              width=args.encoder_width, num_layers=args.encoder_layers)
    loader = common.train_loader(dataset, args, accelerator)
    optimizer, lr_scheduler, steps_per_epoch, max_steps = common.build_optimization(
        accelerator, args, encoder.parameters(), loader)
    encoder, optimizer, lr_scheduler = accelerator.prepare(encoder, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(encoder)
    config = dict(encoder=unwrapped.config, sd_model_id=common.local_or_hub(args.sd_model_id),
                  cond_mode=args.cond_mode, image_size=args.image_size)
    trainer = common.Trainer(
        accelerator=accelerator, args=args, model=encoder, optimizer=optimizer, lr_scheduler=lr_scheduler,
        loader=loader, steps_per_epoch=steps_per_epoch, max_steps=max_steps, kind=CKPT_KIND,
        prefix=CKPT_PREFIX, config=config, model_state=unwrapped.state_dict,
        load_model_state=unwrapped.load_state_dict,
        free_on_resume={"cache_latents"})  # the same trajectory with or without the cache (LatentCache)
    common.resume(trainer, args)
    cache = LatentCache() if args.cache_latents else None

    def compute_loss(batch):
        images = batch["pixel_values"]
        if cache is not None:
            latents = cache.latents(sd, images, batch["index"])
        else:
            latents = sd.encode_images(images)
        return sd.loss(latents, encoder(images))

    val_images = torch.stack([x["pixel_values"] for x in common.validation_items(
        dataset, args.num_validation_images)]).to(accelerator.device)

    def validate(step):
        save_reconstructions(os.path.join(args.output_dir, f"reconstructions_{step}.png"),
                             unwrapped, sd, val_images, args)

    trainer.train(compute_loss, validate, args.validation_steps, desc="stage1")
    if cache is not None:
        common.print_main(accelerator, f"latent cache: {len(cache.store)} images encoded once")
    common.finish_run(trainer, dataset)
    return trainer.step


if __name__ == "__main__":
    errors.run(main)
