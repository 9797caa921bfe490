"""Train the toy world's text-to-image teacher and save it as a diffusers Stable Diffusion folder.

The toy stand-in for SD 2.1: a tiny latent diffusion model (models/toy_teacher.py) trained from
scratch on the toy world (python -m data.toy_world), so every later stage loads it exactly as it
loads SD 2.1:

    StableDiffusionPipeline.from_pretrained(output_dir)      vae/ unet/ text_encoder/ tokenizer/ scheduler/

Three phases on one CPU:
  1. VAE (AutoencoderKL, two downsamplings: 32x32x3 -> 8x8x8), trained briefly, then frozen. Its
     reconstructions are judged first: if they lose colour, no UNet can draw it.
     scaling_factor = 1 / std(latents), saved in the VAE config as SD does.
  2. CLIPTextModel (word-level tokenizer, L=16 with BOS/EOS) pre-trained contrastively against the
     images' latents, as SD's text encoder is a CLIP trained before SD: a text encoder learned from
     scratch inside the diffusion loss was the bottleneck (samples ignored half the caption).
  3. UNet2DConditionModel on the noise-prediction loss (v-prediction, zero terminal SNR), text
     encoder frozen as in SD, ~10% empty captions for classifier-free guidance; batches of 128 with
     two-object scenes drawn 3x as often (they are the hard part). EMA of the weights.
With --mixed_precision bf16 (auto picks it where bf16 is native) the VAE's and the UNet's forward
run under CPU autocast; weights, losses and EMA stay fp32. At the end the saved folder is reloaded,
samples are drawn for val captions (DDIM, guidance against the empty caption) and the pixel judge
scores them: metrics.json, samples.png.

Checkpoints of everything trained so far (VAE, text encoder, UNet, EMA, optimizer, RNG) go to
OUTPUT_DIR.checkpoints/teacher_{step}.pt at the start of phase 3 and every --checkpointing_steps
UNet steps; `--resume_from latest` continues a killed run on the same trajectory, and the folder
is removed once the teacher is saved.

    python -m scripts.train_toy_teacher --preset toy      # the pipeline's recipe (common.PRESETS)
    python -m scripts.train_toy_teacher --data_dir checkpoints/toy/data --output_dir checkpoints/toy/teacher
"""
import argparse
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
import errors
from data.coco import load_rgb, read_captions
from data.judge import judge_image
from data.toy_world import attribute_scores, caption_vocabulary, grouped_accuracy
from models.checkpointing import enable_library_checkpointing
from models.frozen_sd21 import diffusion_target
from models.toy_teacher import (LatentTower, build_scheduler, build_text_encoder, build_tokenizer, build_unet,
                                build_vae, tokenize)

# Flags that do not change what is trained: a resumed run may give them other values.
FREE_ON_RESUME = {"output_dir", "resume_from", "checkpointing_steps", "num_threads", "log_every", "vae_from",
                  "num_samples_eval", "guidance_scale", "num_inference_steps", "num_grid", "preset",
                  "gradient_checkpointing"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--output_dir", default="checkpoints/toy/teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--num_threads", type=int, default=0,
                   help="torch threads; 0 keeps torch's default (on a CPU shared with other jobs, 1 "
                        "can be much faster than 2)")
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--resume_from", default=None,
                   help="latest (the newest checkpoint in OUTPUT_DIR.checkpoints, or a fresh start if "
                        "there is none) or a teacher_{step}.pt; the run must have the same settings")
    p.add_argument("--checkpointing_steps", type=int, default=200,
                   help="UNet steps between checkpoints (only the newest is kept); 0: none")
    common.add_precision_arg(p)
    g = p.add_argument_group("VAE (phase 1)")
    g.add_argument("--vae_from", default=None,
                   help="reuse the VAE of an earlier teacher folder (skips phase 1; its scaling_factor is "
                        "measured again on this data)")
    g.add_argument("--vae_steps", type=int, default=800)
    g.add_argument("--vae_batch_size", type=int, default=32)
    g.add_argument("--vae_lr", type=float, default=3e-3)
    g.add_argument("--vae_channels", default="16,32,64", help="block widths; n blocks = n-1 downsamplings")
    g.add_argument("--latent_channels", type=int, default=8)
    g.add_argument("--kl_weight", type=float, default=0.0,
                   help="KL weight; 0 (a plain autoencoder) keeps reconstructions sharp in a brief run")
    g = p.add_argument_group("text encoder pre-training (phase 2), as CLIP is trained before SD")
    g.add_argument("--clip_steps", type=int, default=1000,
                   help="contrastive caption/latent steps before the UNet (0: the text encoder starts "
                        "from random weights and trains with the UNet)")
    g.add_argument("--clip_batch_size", type=int, default=256)
    g.add_argument("--clip_lr", type=float, default=2e-3)
    g.add_argument("--text_encoder_lr_scale", type=float, default=0.0,
                   help="text encoder lr during phase 3, as a fraction of --lr (0: frozen, as in SD)")
    g = p.add_argument_group("UNet (phase 3)")
    g.add_argument("--max_steps", type=int, default=2400)
    g.add_argument("--batch_size", type=int, default=128,
                   help="the small UNet is overhead-bound on a CPU: a larger batch costs less than its size")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--lr_warmup_steps", type=int, default=100)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute the UNet's and the text encoder's activations in the backward pass (less memory)")
    g.add_argument("--ema_decay", type=float, default=0.999, help="0 disables EMA of the weights")
    g.add_argument("--two_object_weight", type=float, default=3.0,
                   help="draw two-object scenes this many times as often as one-object ones (1: "
                        "uniform); they are a third of the data and the harder part to draw")
    g.add_argument("--caption_dropout", type=float, default=0.1,
                   help="fraction of empty captions, so classifier-free guidance works")
    g.add_argument("--unet_channels", default="64,128,128")
    g.add_argument("--unet_attn", default="0,1,1",
                   help="per level: 1 = cross-attention block, 0 = plain ResNet block")
    g.add_argument("--unet_layers_per_block", type=int, default=1)
    g.add_argument("--attention_head_dim", type=int, default=8)
    g.add_argument("--text_time_embedding", action=argparse.BooleanOptionalAction, default=True,
                   help="an attention-pooled caption embedding also modulates every ResNet block "
                        "(diffusers addition_embed_type='text', FiLM scale-shift), besides cross-attention")
    g.add_argument("--text_width", type=int, default=64, help="D, the cross-attention width")
    g.add_argument("--text_layers", type=int, default=2)
    g.add_argument("--max_length", type=int, default=16, help="L, tokens including BOS/EOS")
    g.add_argument("--prediction_type", default="v_prediction", choices=["epsilon", "v_prediction"])
    g.add_argument("--beta_schedule", default="scaled_linear",
                   choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    g.add_argument("--zero_terminal_snr", action=argparse.BooleanOptionalAction, default=True,
                   help="rescale the betas so t=T is pure noise (Lin et al. 2024), as sampling starts "
                        "from pure noise; needs v_prediction (ignored with epsilon)")
    g.add_argument("--snr_gamma", type=float, default=0.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper and in diffusers' "
                        "examples); 0: the plain MSE. On the toy world it learns the objects sooner and "
                        "the arrangement of two worse (docs/measurements.md, Min-SNR-gamma)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--num_samples_eval", type=int, default=200, help="val captions sampled and judged")
    g.add_argument("--guidance_scale", type=float, default=2.0,
                   help="judged best at 2 (1.5-2.5 close); 3 and more push colours and shapes off")
    g.add_argument("--num_inference_steps", type=int, default=20)
    g.add_argument("--num_grid", type=int, default=24, help="samples shown in samples.png")
    return p


def parse_args(argv=None):
    return common.parse_with_preset(build_parser(), argv, stage="teacher")


def ints(text):
    return tuple(int(x) for x in str(text).split(","))


def loss_weights(scheduler, t, snr_gamma):
    """[B] per-sample weights of the diffusion MSE: ones, or Min-SNR-gamma's min(SNR, gamma) on the
    x0 error, put in terms of the scheduler's prediction target."""
    if not snr_gamma:
        return torch.ones(len(t))
    from diffusers.training_utils import compute_snr
    snr = compute_snr(scheduler, t)
    weights = snr.clamp(max=snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    # epsilon: the x0 error is the noise error over SNR; at SNR 0 (zero terminal SNR) keep weight 1
    return torch.where(snr > 0, weights / snr.clamp(min=1e-8), torch.ones_like(snr))


def cosine_schedule(optimizer, warmup, total):
    """Linear warm-up, then cosine decay to 10% of the learning rate."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=0.1)


def autocast(args):
    """bf16: CPU autocast for the VAE's and the UNet's forward; no: a context that does nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")


# ---------------------------------------------------------------------------------------------
# Data

def load_images(data_dir, split, image_size):
    """All images of a split in memory (the toy world is small): uint8 [N,3,S,S], entries, captions."""
    ann = os.path.join(data_dir, "annotations", f"captions_{split}2017.json")
    images, captions = read_captions(ann, f"generate the toy world with `python -m data.toy_world --output_dir "
                                          f"{data_dir}`")
    entries = list(images.values())
    pixels = np.empty((len(entries), image_size, image_size, 3), np.uint8)
    for i, e in enumerate(entries):
        img = load_rgb(os.path.join(data_dir, f"{split}2017", e["file_name"]))  # raises UnreadableImage
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BOX)
        pixels[i] = np.asarray(img)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), entries, captions


def to_model(pixels_uint8):
    """uint8 [B,3,S,S] -> float [-1,1], the SD VAE's input range."""
    return pixels_uint8.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Phase 1: VAE

def train_vae(args, vae, train_pixels, gen):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = cosine_schedule(opt, min(50, args.vae_steps // 10 + 1), args.vae_steps)
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(train_pixels), (args.vae_batch_size,), generator=gen)
        x = to_model(train_pixels[idx])                                  # [B,3,S,S]
        with autocast(args):
            moments = vae.encode(x).latent_dist.parameters                  # [B,2C,h,w]
        posterior = DiagonalGaussianDistribution(moments.float())
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        with autocast(args):
            recon = vae.decode(z).sample.float()
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            print(f"vae step {step:5d}  recon {rec.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, pixels, batch=256):
    """Posterior (mean, std) of every image: the VAE is frozen, so this is done once."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        post = vae.encode(to_model(pixels[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_to_uint8(vae, latents_unscaled):
    x = vae.decode(latents_unscaled).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def phase_vae(args, train_pixels, val_pixels, val_entries, state, gen, timings):
    """The frozen VAE, its posterior over the train images and its scaling factor (phase 1, or the
    checkpoint's, or --vae_from's), with its val reconstructions judged."""
    from diffusers import AutoencoderKL
    t0 = time.time()
    if state:
        vae = AutoencoderKL.from_config(state["vae_config"])
        vae.load_state_dict(state["vae"])
        vae.eval().requires_grad_(False)
    elif args.vae_from:
        try:
            vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            common.die(f"--vae_from {args.vae_from}: no VAE there ({type(e).__name__}); "
                       f"pass a teacher folder this script wrote")
    else:
        vae = build_vae(image_size=args.image_size, channels=ints(args.vae_channels),
                        latent_channels=args.latent_channels)
        train_vae(args, vae, train_pixels, gen)
    if not state:
        timings["vae_train_s"] = time.time() - t0
    mean, std = encode_all(vae, train_pixels)                                   # [N,C,h,w] each
    if state:
        scaling = state["scaling"]
    else:
        scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scaling)
    val_mean, _ = encode_all(vae, val_pixels)
    vae_groups = judge(list(decode_to_uint8(vae, val_mean)), val_entries)[1]
    print(f"latents {tuple(mean.shape[1:])}, scaling_factor {scaling:.4f}")
    print(common.accuracy_table(vae_groups, "VAE reconstructions"), flush=True)
    return vae, mean, std, scaling, vae_groups


# ---------------------------------------------------------------------------------------------
# Phase 2: CLIP-style text encoder

def pretrain_text_encoder(args, text_encoder, latents, tokens, gen):
    """Symmetric InfoNCE between captions (EOS state, as CLIP pools) and their images' latents.
    latents [N,C,h,w] (scaled), tokens [N,k,L] (k captions per image). Returns the last batch's
    caption->image top-1 accuracy."""
    dim = 128
    tower = LatentTower(latents.shape[1], latents.shape[-1], dim)
    text_proj = torch.nn.Linear(args.text_width, dim, bias=False)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*text_encoder.parameters(), *tower.parameters(), *text_proj.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=args.clip_lr, weight_decay=0.0)
    sched = cosine_schedule(opt, min(50, args.clip_steps // 10 + 1), args.clip_steps)
    text_encoder.train()
    t0, acc = time.time(), float("nan")
    for step in range(args.clip_steps):
        idx = torch.randperm(len(latents), generator=gen)[:args.clip_batch_size]
        ids = tokens[idx, torch.randint(0, tokens.shape[1], (len(idx),), generator=gen)]
        img = F.normalize(tower(latents[idx]), dim=-1)
        txt = F.normalize(text_proj(text_encoder(ids).pooler_output), dim=-1)
        logits = log_scale.exp().clamp(max=100) * txt @ img.T                 # [B,B]
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        # duplicates in the batch (same scene twice) make top-1 a lower bound
        acc = (logits.argmax(1) == labels).float().mean().item()
        if step % args.log_every == 0 or step == args.clip_steps - 1:
            print(f"clip step {step:5d}  loss {loss.item():.4f}  caption->image top-1 {acc:.3f}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
    return acc


# ---------------------------------------------------------------------------------------------
# Phase 3: UNet

def train_unet(args, unet, text_encoder, scheduler, latents, tokens, draw_weights, empty_tokens, gen, state,
               checkpoint):
    """The UNet (and the text encoder when it trains) on the diffusion loss, from step 0 or the
    checkpoint's; checkpoint(step, unet_state) saves. Leaves the EMA weights in the models."""
    from diffusers.training_utils import EMAModel
    mean, std, scaling = latents
    text_trains = args.text_encoder_lr_scale > 0 or args.clip_steps == 0
    text_encoder.requires_grad_(text_trains).train(text_trains)
    groups = [{"params": list(unet.parameters()), "lr": args.lr}]
    if text_trains:
        scale = args.text_encoder_lr_scale if args.clip_steps else 1.0
        groups.append({"params": list(text_encoder.parameters()), "lr": args.lr * scale})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = cosine_schedule(opt, args.lr_warmup_steps, args.max_steps)
    ema = EMAModel(params, decay=args.ema_decay, foreach=True) if args.ema_decay > 0 else None
    start = 0
    if state:
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"])
        common.set_rng_state(state["rng"])
        start = state["step"]

    def unet_state():
        return {"unet": unet.state_dict(), "ema": ema.state_dict() if ema else None,
                "optimizer": opt.state_dict(), "lr_scheduler": lr_sched.state_dict(), "gen": gen.get_state(),
                "rng": common.rng_state(), "text_encoder": text_encoder.state_dict()}

    if not state:
        checkpoint(0, unet_state)  # phases 1 and 2 are kept from here on
    unet.train()
    t0, running, k = time.time(), [], tokens.shape[1]
    for step in range(start, args.max_steps):
        idx = torch.multinomial(draw_weights, args.batch_size, replacement=True, generator=gen)
        which = torch.randint(0, k, (args.batch_size,), generator=gen)
        ids = tokens[idx, which]                                                # [B,L]
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        ids = torch.where(drop[:, None], empty_tokens, ids)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        with torch.set_grad_enabled(text_trains):
            cond = text_encoder(ids).last_hidden_state                          # [B,L,D]
        with autocast(args):
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), diffusion_target(scheduler, x0, noise, t), reduction="none")
        loss = (loss.mean(dim=(1, 2, 3)) * loss_weights(scheduler, t, args.snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        lr_sched.step()
        if ema is not None:
            ema.step(params)
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.max_steps - 1:
            print(f"step {step:5d}  loss {np.mean(running):.4f}  lr {lr_sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
            running = []
        if step + 1 == args.max_steps or (args.checkpointing_steps and (step + 1) % args.checkpointing_steps == 0):
            checkpoint(step + 1, unet_state)
    if ema is not None:
        ema.copy_to(params)
    unet.eval()
    text_encoder.eval()


# ---------------------------------------------------------------------------------------------
# Evaluation

def judge(images, entries):
    """Judge each image once against its entry's scene -> (per-image attribute_scores,
    data.toy_world.grouped_accuracy of them)."""
    scores = [attribute_scores(judge_image(img), e["scene"]) for img, e in zip(images, entries)]
    return scores, grouped_accuracy(scores, entries)


@torch.no_grad()
def evaluate_folder(folder, entries, captions, num_samples=200, guidance_scale=2.0, num_inference_steps=20,
                    image_size=32, seed=0):
    """Reload the saved folder through diffusers (the path every later stage uses), sample one
    image per val caption with DDIM + guidance against "", and judge it. -> (uint8 images,
    the entries, the captions drawn)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    entries = entries[:num_samples]
    prompts = [captions[e["id"]][0] for e in entries]
    images = []
    for i in range(0, len(prompts), 50):
        chunk = prompts[i:i + 50]
        out = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), height=image_size, width=image_size,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="np",
                   generator=torch.Generator().manual_seed(seed + i)).images
        images += [(im * 255).round().astype(np.uint8) for im in out]
    return images, entries, prompts


def save_and_judge(args, pipe, out_dir, val_entries, val_captions, timings, spent, metrics):
    """Save the pipeline to a temporary folder, sample and judge it there, write metrics.json and
    samples.png, and swap the folder in: a run killed before that leaves any old teacher intact."""
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipe.save_pretrained(tmp_dir)
    t0 = time.time()
    images, entries, prompts = evaluate_folder(tmp_dir, val_entries, val_captions, args.num_samples_eval,
                                               args.guidance_scale, args.num_inference_steps, args.image_size,
                                               args.seed)
    timings["eval_s"] = time.time() - t0
    scores, sample_groups = judge(images, entries)
    # the grid shows held-out scenes too: pick alternately from seen and held-out
    seen = [i for i, e in enumerate(entries) if not e["heldout"]]
    held = [i for i, e in enumerate(entries) if e["heldout"]]
    order = ([i for pair in zip(seen, held) for i in pair] + seen[len(held):] + held[len(seen):])[:args.num_grid]
    if order:  # --num_samples_eval 0 samples nothing: no grid
        common.save_grid(os.path.join(tmp_dir, "samples.png"), [images[i] for i in order], ncol=6,
                         captions=[prompts[i] for i in order], tile=96,
                         colours=[(0, 128, 0) if scores[i]["all"] else (200, 0, 0) for i in order])
    timings.update(spent())
    metrics.update(samples=sample_groups, guidance_scale=args.guidance_scale,
                   num_inference_steps=args.num_inference_steps,
                   timings={k: round(v, 1) for k, v in timings.items()}, args=vars(args))
    common.save_json(os.path.join(tmp_dir, "metrics.json"), metrics)
    common.replace_dir(tmp_dir, out_dir)
    print(common.accuracy_table(sample_groups, f"samples (guidance {args.guidance_scale})"))
    return metrics


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    from diffusers import StableDiffusionPipeline

    print(common.resolve_precision(args, cuda=False), flush=True)  # the teacher runs on the CPU
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start, timings = time.time(), {}

    train_pixels, train_entries, train_caps = load_images(args.data_dir, "train", args.image_size)
    val_pixels, val_entries, val_caps = load_images(args.data_dir, "val", args.image_size)
    # captions of image i: train_tokens[i, k]; every image has the same number in the toy world
    caps = [train_caps[e["id"]] for e in train_entries]
    k = min(len(c) for c in caps)
    tokenizer = build_tokenizer([c for cs in caps for c in cs], args.max_length, caption_vocabulary())
    train_tokens = tokenize(tokenizer, [c for cs in caps for c in cs[:k]], args.max_length).view(len(caps), k, -1)
    empty_tokens = tokenize(tokenizer, [""], args.max_length)                   # [1,L]
    print(f"{len(train_pixels)} train / {len(val_pixels)} val images, vocab {len(tokenizer)}", flush=True)

    out_dir = os.path.abspath(args.output_dir)
    ckpt_dir = f"{out_dir}.checkpoints"
    resume = common.resolve_resume(args.resume_from, ckpt_dir, "teacher")
    state = common.load_checkpoint(resume, "teacher") if resume else None
    if state:
        common.check_resume_settings(resume, state["args"], args, FREE_ON_RESUME, f"delete {ckpt_dir} to start afresh")
        print(f"resuming from {resume} (UNet step {state['step']})", flush=True)
        timings.update(state["timings"])
    # Wall and CPU seconds count the processes this run resumed from (up to their last checkpoint).
    spent_before = {key: timings.pop(key, 0.0) for key in ("total_s", "cpu_s")}

    def spent():
        return {"total_s": spent_before["total_s"] + time.time() - t_start,
                "cpu_s": spent_before["cpu_s"] + time.process_time()}  # CPU time: comparable across loaded machines

    vae, mean, std, scaling, vae_groups = phase_vae(args, train_pixels, val_pixels, val_entries, state, gen, timings)
    text_encoder = build_text_encoder(tokenizer, width=args.text_width, layers=args.text_layers,
                                      max_length=args.max_length)
    if args.gradient_checkpointing:
        enable_library_checkpointing(text_encoder)
    if state:
        text_encoder.load_state_dict(state["text_encoder"])
        clip_acc = state["clip_acc"]
    else:
        t0 = time.time()
        clip_acc = pretrain_text_encoder(args, text_encoder, mean * scaling, train_tokens, gen)
        timings["clip_train_s"] = time.time() - t0

    unet = build_unet(mean.shape[1], mean.shape[-1], channels=ints(args.unet_channels), attention=ints(args.unet_attn),
                      layers_per_block=args.unet_layers_per_block, attention_head_dim=args.attention_head_dim,
                      text_width=args.text_width, text_time_embedding=args.text_time_embedding)
    if args.gradient_checkpointing:
        enable_library_checkpointing(unet)
    if args.mixed_precision == "bf16":
        # The toy UNet attends over 4-16 positions. There, in bf16, SDPA's CPU flash kernel is slower
        # than diffusers' plain-matmul processor (docs/measurements.md, Teacher step). Training
        # only: the saved folder keeps the default processor.
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())
    scheduler = build_scheduler(args.prediction_type, args.beta_schedule, args.zero_terminal_snr)
    draw_weights = torch.tensor([args.two_object_weight if len(e["scene"]["objects"]) == 2 else 1.0
                                 for e in train_entries])
    t0 = time.time() - timings.get("unet_train_s", 0.0)

    def checkpoint(step, unet_state):
        if args.checkpointing_steps > 0:
            os.makedirs(ckpt_dir, exist_ok=True)
            common.save_checkpoint(os.path.join(ckpt_dir, f"teacher_{step}.pt"), {
                "kind": "teacher", "step": step, "args": vars(args), "vae_config": dict(vae.config),
                "vae": vae.state_dict(), "scaling": scaling, "clip_acc": clip_acc, **unet_state(),
                "timings": {**timings, **spent(), "unet_train_s": time.time() - t0}})
            common.prune_checkpoints(ckpt_dir, "teacher", 1)  # each holds everything, ~4x the UNet

    train_unet(args, unet, text_encoder, scheduler, (mean, std, scaling), train_tokens, draw_weights, empty_tokens,
               gen, state, checkpoint)
    timings["unet_train_s"] = time.time() - t0

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    metrics = {"vae_reconstruction": vae_groups, "clip_top1_last_batch": round(clip_acc, 4),
               "params": {name: sum(p.numel() for p in m.parameters())
                          for name, m in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae))}}
    metrics = save_and_judge(args, pipe, out_dir, val_entries, val_caps, timings, spent, metrics)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the teacher is saved: nothing left to resume
    print(f"saved {out_dir}  ({timings['total_s']:.0f}s: vae {timings['vae_train_s']:.0f}s, "
          f"unet {timings['unet_train_s']:.0f}s, eval {timings['eval_s']:.0f}s)")
    return metrics


if __name__ == "__main__":
    errors.run(main)
