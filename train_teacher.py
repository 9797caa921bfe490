"""Train the toy world's text-to-image teacher and save it as a diffusers Stable Diffusion folder.

The toy stand-in for SD 2.1: a tiny latent diffusion model trained from scratch on the toy world
(python -m data.toy_world), so every later stage loads it exactly as it loads SD 2.1:

    StableDiffusionPipeline.from_pretrained(output_dir)      vae/ unet/ text_encoder/ tokenizer/ scheduler/

Three phases on one CPU:
  1. VAE (AutoencoderKL, two downsamplings: 32x32x3 -> 8x8x8), trained briefly (under bf16
     autocast), then frozen.
     Its reconstructions are judged first: if they lose colour, no UNet can draw it.
     scaling_factor = 1 / std(latents), saved in the VAE config as SD does.
  2. CLIPTextModel (word-level tokenizer, L=16 with BOS/EOS) pre-trained contrastively against the
     images' latents, as SD's text encoder is a CLIP trained before SD: a text encoder learned from
     scratch inside the diffusion loss was the bottleneck (samples ignored half the caption).
  3. UNet2DConditionModel on the noise-prediction loss (v-prediction, zero terminal SNR), text
     encoder frozen as in SD, ~10% empty captions for classifier-free guidance; batches of 128 with
     two-object scenes drawn 3x as often (they are the hard part), the UNet under bf16 autocast.
At the end the saved folder is reloaded, samples are drawn for val captions (DDIM, guidance against
the empty caption) and the pixel judge scores them: metrics.json, samples.png.

Checkpoints of everything trained so far (VAE, text encoder, UNet, EMA, optimizer, RNG) go to
OUTPUT_DIR.checkpoints/teacher_{step}.pt at the start of phase 3 and every --checkpointing_steps
UNet steps; `--resume_from latest` continues a killed run on the same trajectory, and the folder
is removed once the teacher is saved.

    python train_teacher.py --data_dir checkpoints/toy/data --output_dir checkpoints/toy/teacher
"""
import argparse
import copy
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import common
from data.judge import judge_image
from data.toy_world import accuracy, attribute_scores, caption_vocabulary, load_split

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the toy text-to-image teacher (a tiny SD folder).")
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
    p.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16"],
                   help="bf16: the VAE's and the UNet's forward under CPU autocast (weights, loss and EMA stay fp32)")
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
                        "from random weights and trains with the UNet, the old recipe)")
    g.add_argument("--clip_batch_size", type=int, default=256)
    g.add_argument("--clip_lr", type=float, default=2e-3)
    g.add_argument("--text_encoder_lr_scale", type=float, default=0.0,
                   help="text encoder lr during phase 3, as a fraction of --lr (0: frozen, as in SD)")
    g = p.add_argument_group("UNet (phase 3)")
    g.add_argument("--max_steps", type=int, default=2400)
    g.add_argument("--batch_size", type=int, default=128,
                   help="the small UNet is overhead-bound on a CPU: 4x the batch costs about 3x the time")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--lr_warmup_steps", type=int, default=100)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
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
    g.add_argument("--text_time_embedding", type=int, default=1,
                   help="1: an attention-pooled caption embedding also modulates every ResNet block "
                        "(diffusers addition_embed_type='text', FiLM scale-shift), besides cross-attention")
    g.add_argument("--text_width", type=int, default=64, help="D, the cross-attention width")
    g.add_argument("--text_layers", type=int, default=2)
    g.add_argument("--max_length", type=int, default=16, help="L, tokens including BOS/EOS")
    g.add_argument("--prediction_type", default="v_prediction", choices=["epsilon", "v_prediction"])
    g.add_argument("--beta_schedule", default="scaled_linear",
                   choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    g.add_argument("--zero_terminal_snr", type=int, default=1,
                   help="1: rescale the betas so t=T is pure noise (Lin et al. 2024), as sampling starts "
                        "from pure noise; needs v_prediction (ignored with epsilon)")
    g.add_argument("--snr_gamma", type=float, default=0.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper and in diffusers' "
                        "examples); 0: the plain MSE. On the toy world it learns the objects sooner and "
                        "the arrangement of two worse (README, Min-SNR-gamma)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--num_samples_eval", type=int, default=200, help="val captions sampled and judged")
    g.add_argument("--guidance_scale", type=float, default=2.0,
                   help="judged best at 2 (1.5-2.5 close); 3 and more push colours and shapes off (README)")
    g.add_argument("--num_inference_steps", type=int, default=20)
    g.add_argument("--num_grid", type=int, default=24, help="samples shown in samples.png")
    return p.parse_args(argv)


def ints(text):
    return tuple(int(x) for x in str(text).split(","))


# ---------------------------------------------------------------------------------------------
# Data

def load_images(data_dir, split, image_size):
    """All images of a split in memory (the toy world is small): uint8 [N,3,S,S], entries, captions."""
    entries, captions = load_split(data_dir, split)
    if not entries:
        common.die(f"{data_dir}: the {split} split has no images; regenerate the toy world")
    pixels = np.empty((len(entries), image_size, image_size, 3), np.uint8)
    for i, e in enumerate(entries):
        path = os.path.join(data_dir, f"{split}2017", e["file_name"])
        try:
            img = Image.open(path).convert("RGB")
        except OSError:
            common.die(f"{path}: cannot read the image; regenerate the toy world")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BOX)
        pixels[i] = np.asarray(img)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), entries, captions


def to_model(pixels_uint8):
    """uint8 [B,3,S,S] -> float [-1,1], the SD VAE's input range."""
    return pixels_uint8.float() / 127.5 - 1.0


def build_tokenizer(captions, max_length):
    """Word-level tokenizer over the toy captions, wrapped as PreTrainedTokenizerFast: lower-cased,
    split on whitespace and punctuation, <bos> ... <eos> added, padded with <pad>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set(caption_vocabulary())
    for c in captions:
        words.update(c.lower().split())
    specials = [SPECIAL["pad"], SPECIAL["unk"], SPECIAL["bos"], SPECIAL["eos"]]
    vocab = {t: i for i, t in enumerate(specials + sorted(words - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL["bos"], SPECIAL["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"], model_max_length=max_length, padding_side="right")


def tokenize(tokenizer, texts, max_length):
    return tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# Models

def build_vae(args):
    from diffusers import AutoencoderKL
    ch = ints(args.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=args.latent_channels, block_out_channels=ch,
        down_block_types=("DownEncoderBlock2D",) * len(ch), up_block_types=("UpDecoderBlock2D",) * len(ch),
        layers_per_block=1, norm_num_groups=8, sample_size=args.image_size,
        mid_block_add_attention=False)  # flat shapes need no global attention; a third faster
    # Start the posterior narrow (std ~0.02, not 1): with SD's tiny KL weight the std shrinks only
    # slowly, and a brief run would otherwise train a decoder that blurs everything.
    with torch.no_grad():
        vae.quant_conv.bias[args.latent_channels:] = -8.0
    return vae


def build_unet(args, latent_channels, latent_size):
    from diffusers import UNet2DConditionModel
    ch, attn = ints(args.unet_channels), ints(args.unet_attn)
    if len(ch) != len(attn):
        common.die("--unet_attn needs one 0/1 per --unet_channels level")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=ch, down_block_types=down, up_block_types=up,
        layers_per_block=args.unet_layers_per_block, norm_num_groups=min(32, ch[0]),
        cross_attention_dim=args.text_width, attention_head_dim=args.attention_head_dim,
        use_linear_projection=True,
        # Global conditioning reaches every block from the start (as in DeepFloyd IF); cross-
        # attention alone learned place but not colour or shape within a CPU budget. It reads
        # only encoder_hidden_states, so every SD code path drives it unchanged.
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=4,
                resnet_time_scale_shift="scale_shift") if args.text_time_embedding else {}))


def build_text_encoder(args, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_width, intermediate_size=4 * args.text_width,
        num_hidden_layers=args.text_layers, num_attention_heads=4,
        max_position_embeddings=args.max_length, hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))


def build_scheduler(args):
    from diffusers import DDPMScheduler
    # SD's scaled_linear betas; with zero terminal SNR the last step holds no trace of the image,
    # as at sampling time: otherwise the model learns to read the layout from the ~7% of signal
    # left at t=T and places objects at random from pure noise. Epsilon cannot predict at zero
    # SNR (x0 = (x - sqrt(1-a) eps) / sqrt(a) with a = 0), hence v-prediction.
    # "trailing" spacing makes DDIM start at t=999 rather than 951.
    linear = args.beta_schedule == "linear"
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=args.beta_schedule,
                         beta_start=0.0001 if linear else 0.00085, beta_end=0.02 if linear else 0.012,
                         prediction_type=args.prediction_type, clip_sample=False, steps_offset=1,
                         timestep_spacing="trailing",
                         rescale_betas_zero_snr=bool(args.zero_terminal_snr) and args.prediction_type == "v_prediction")


def lr_lambda(warmup, total):
    """Linear warm-up, then cosine decay to 10%."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def autocast(args):
    """--mixed_precision bf16: CPU autocast for the VAE's and the UNet's forward (weights, loss and
    EMA stay fp32); no: a context that does nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")


# ---------------------------------------------------------------------------------------------
# Phase 1: VAE

def train_vae(args, vae, train_pixels, gen):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    # bf16: convolutions under autocast, 1.0-1.6x a step here (README, Teacher step); the sample,
    # the loss and the weights stay fp32.
    bf16 = autocast(args)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(50, args.vae_steps // 10 + 1), args.vae_steps))
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(train_pixels), (args.vae_batch_size,), generator=gen)
        x = to_model(train_pixels[idx])                                  # [B,3,S,S]
        with bf16:
            moments = vae.encode(x).latent_dist.parameters                  # [B,2C,h,w]
        posterior = DiagonalGaussianDistribution(moments.float())
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        with bf16:
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


# ---------------------------------------------------------------------------------------------
# Phase 2: CLIP-style text encoder

class LatentTower(torch.nn.Module):
    """The image side of the contrastive pre-training, on VAE latents [B,C,h,w] -> [B,E]. Flattened,
    not pooled: where an object is belongs in the embedding (captions say "on the left")."""

    def __init__(self, channels, size, dim):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 64, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Flatten(), torch.nn.Linear(128 * ((size + 1) // 2) ** 2, dim))

    def forward(self, x):
        return self.net(x)


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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(50, args.clip_steps // 10 + 1), args.clip_steps))
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
# Evaluation

def judge_groups(images, entries):
    """Judge each image once against its entry's scene -> (per-image attribute_scores,
    {group: {"n", attr: accuracy}}) with groups "seen", "heldout", "overall" and seen/held-out
    split by the number of objects."""
    scores = [attribute_scores(judge_image(img), e["scene"]) for img, e in zip(images, entries)]
    members = {}
    for result, e in zip(scores, entries):
        split = "heldout" if e["heldout"] else "seen"
        for name in (split, f"{split}, {len(e['scene']['objects'])} obj", "overall"):
            members.setdefault(name, []).append(result)
    groups = {name: {"n": len(results), **{k: round(v, 4) for k, v in accuracy(results).items()}}
              for name, results in members.items()}
    return scores, groups


def markdown_table(groups, title):
    cols = ["colour", "shape", "size", "position", "relation", "all"]
    lines = [f"| {title} | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name in ("seen", "seen, 1 obj", "seen, 2 obj", "heldout", "overall"):
        if name in groups:
            g = groups[name]
            cells = [f"{100 * g[c]:.1f}" if c in g else "-" for c in cols]
            lines.append(f"| {name} | {g['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_grid(images, captions, correct, path, ncol=6, tile=96):
    """Samples (upscaled) with their captions underneath; green text = judged all-correct."""
    font = ImageFont.load_default()
    cell_w, text_h = tile + 64, 40
    rows = math.ceil(len(images) / ncol)
    sheet = Image.new("RGB", (ncol * cell_w, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, cap, ok) in enumerate(zip(images, captions, correct)):
        x, y = (i % ncol) * cell_w, (i // ncol) * (tile + text_h)
        sheet.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x + 32, y))
        lines, line = [], ""
        for w in cap.split():
            if len(line) + len(w) + 1 > 26:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines[:3]), fill=(0, 128, 0) if ok else (200, 0, 0),
                            font=font, spacing=1)
    sheet.save(path)


@torch.no_grad()
def evaluate_folder(folder, args, val_entries, val_captions):
    """Reload the saved folder through diffusers (the path every later stage uses), sample one
    image per val caption with DDIM + guidance against "", and judge it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    entries = val_entries[:args.num_samples_eval]
    captions = [val_captions[e["id"]][0] for e in entries]
    images = []
    for i in range(0, len(captions), 50):
        chunk = captions[i:i + 50]
        out = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), height=args.image_size,
                   width=args.image_size, num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, output_type="np",
                   generator=torch.Generator().manual_seed(args.seed + i)).images
        images += [(im * 255).round().astype(np.uint8) for im in out]
    return images, entries, captions


# ---------------------------------------------------------------------------------------------
# Checkpoints: a killed run resumes on the same trajectory

# Flags that do not change what is trained: a resumed run may give them other values.
FREE_ON_RESUME = {"output_dir", "resume_from", "checkpointing_steps", "num_threads", "log_every", "vae_from",
                  "num_samples_eval", "guidance_scale", "num_inference_steps", "num_grid"}


def load_resume_state(path, args):
    state = common.load_checkpoint(path, "teacher")
    differ = sorted(k for k, v in vars(args).items()
                    if k not in FREE_ON_RESUME and state["args"].get(k) != v)
    if differ:
        was = ", ".join(f"--{k} {state['args'].get(k)}" for k in differ)
        common.die(f"{path} was written by a run with other settings ({was}); resume with those, "
                   f"or delete {os.path.dirname(path)} to start afresh")
    return state


def save_resume_state(ckpt_dir, step, state):
    """teacher_{step}.pt, written atomically; older ones go (each holds everything, ~4x the UNet)."""
    path = os.path.join(ckpt_dir, f"teacher_{step}.pt")
    os.makedirs(ckpt_dir, exist_ok=True)
    common.save_checkpoint(path, {"kind": "teacher", "step": step, **state})
    for old in common.list_checkpoints(ckpt_dir, "teacher"):
        if old != path:
            os.remove(old)


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    from diffusers import StableDiffusionPipeline

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()
    timings = {}

    train_pixels, train_entries, train_caps = load_images(args.data_dir, "train", args.image_size)
    val_pixels, val_entries, val_caps = load_images(args.data_dir, "val", args.image_size)
    # captions of image i: train_tokens[i, k]; every image has the same number in the toy world
    caps = [train_caps[e["id"]] for e in train_entries]
    k = min(len(c) for c in caps)
    tokenizer = build_tokenizer([c for cs in caps for c in cs], args.max_length)
    train_tokens = tokenize(tokenizer, [c for cs in caps for c in cs[:k]], args.max_length).view(len(caps), k, -1)
    empty_tokens = tokenize(tokenizer, [""], args.max_length)                   # [1,L]
    print(f"{len(train_pixels)} train / {len(val_pixels)} val images, vocab {len(tokenizer)}", flush=True)

    out_dir = os.path.abspath(args.output_dir)
    ckpt_dir = f"{out_dir}.checkpoints"
    resume = common.resolve_resume(args.resume_from, ckpt_dir, "teacher")
    state = load_resume_state(resume, args) if resume else None
    if state:
        print(f"resuming from {resume} (UNet step {state['step']})", flush=True)
        timings.update(state["timings"])
    # Wall and CPU seconds count the processes this run resumed from (up to their last checkpoint).
    spent_before = {k: timings.pop(k, 0.0) for k in ("total_s", "cpu_s")}

    def spent():
        return {"total_s": spent_before["total_s"] + time.time() - t_start,
                "cpu_s": spent_before["cpu_s"] + time.process_time()}  # CPU time: comparable across loaded machines

    # ---- phase 1: VAE ----
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
        vae = build_vae(args)
        train_vae(args, vae, train_pixels, gen)
    if not state:
        timings["vae_train_s"] = time.time() - t0
    mean, std = encode_all(vae, train_pixels)                                   # [N,C,h,w] each
    if state:
        scaling = state["scaling"]
    else:
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        scaling = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling)
    val_mean, _ = encode_all(vae, val_pixels)
    recon = decode_to_uint8(vae, val_mean)
    _, vae_groups = judge_groups(list(recon), val_entries)
    print(f"latents {tuple(mean.shape[1:])}, scaling_factor {scaling:.4f}")
    print(markdown_table(vae_groups, "VAE recon"), flush=True)

    # ---- phase 2: text encoder, contrastive ----
    text_encoder = build_text_encoder(args, tokenizer)
    if state:
        text_encoder.load_state_dict(state["text_encoder"])
        clip_acc = state["clip_acc"]
    else:
        t0 = time.time()
        clip_acc = pretrain_text_encoder(args, text_encoder, mean * scaling, train_tokens, gen)
        timings["clip_train_s"] = time.time() - t0

    # ---- phase 3: UNet (+ text encoder when --text_encoder_lr_scale > 0) ----
    unet = build_unet(args, mean.shape[1], mean.shape[-1])
    if args.mixed_precision == "bf16":
        # The toy UNet attends over 4-16 positions. There, in bf16, SDPA's CPU flash kernel is slower
        # than diffusers' plain-matmul processor: 5-12% of a training step (README, Teacher step).
        # Training only: the saved folder keeps the default processor.
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())
    scheduler = build_scheduler(args)
    from models.frozen_sd21 import diffusion_target
    text_trains = args.text_encoder_lr_scale > 0 or args.clip_steps == 0
    text_encoder.requires_grad_(text_trains).train(text_trains)
    groups = [{"params": list(unet.parameters()), "lr": args.lr}]
    if text_trains:
        scale = args.text_encoder_lr_scale if args.clip_steps else 1.0
        groups.append({"params": list(text_encoder.parameters()), "lr": args.lr * scale})
    params = [p for g in groups for p in g["params"]]
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    print(f"unet {n_unet / 1e6:.2f}M params, text encoder {n_text / 1e6:.2f}M params "
          f"({'trained' if text_trains else 'frozen'})", flush=True)
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.lr_warmup_steps, args.max_steps))
    ema = [p.detach().clone() for p in params] if args.ema_decay > 0 else None
    draw_weights = torch.tensor([args.two_object_weight if len(e["scene"]["objects"]) == 2 else 1.0
                                 for e in train_entries])
    start = 0
    if state:
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        if ema is not None:
            torch._foreach_copy_(ema, state["ema"])
        gen.set_state(state["gen"])
        common.set_rng_state(state["rng"])
        start = state["step"]

    def checkpoint(step):
        if args.checkpointing_steps > 0:
            save_resume_state(ckpt_dir, step, {
                "args": vars(args), "vae_config": dict(vae.config), "vae": vae.state_dict(), "scaling": scaling,
                "text_encoder": text_encoder.state_dict(), "clip_acc": clip_acc,
                "unet": unet.state_dict(), "ema": ema, "optimizer": opt.state_dict(),
                "lr_scheduler": lr_sched.state_dict(), "gen": gen.get_state(), "rng": common.rng_state(),
                "timings": {**timings, **spent(), "unet_train_s": time.time() - t0}})

    unet.train()
    t0, running = time.time() - timings.get("unet_train_s", 0.0), []
    if not state:
        checkpoint(0)  # phases 1 and 2 are kept from here on
    for step in range(start, args.max_steps):
        idx = torch.multinomial(draw_weights, args.batch_size, replacement=True, generator=gen)
        which = torch.randint(0, k, (args.batch_size,), generator=gen)
        ids = train_tokens[idx, which]                                          # [B,L]
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        ids = torch.where(drop[:, None], empty_tokens, ids)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.set_grad_enabled(text_trains):
            cond = text_encoder(ids).last_hidden_state                          # [B,L,D]
        with autocast(args):
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), diffusion_target(scheduler, latents, noise, t), reduction="none")
        loss = (loss.mean(dim=(1, 2, 3)) * loss_weights(scheduler, t, args.snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        lr_sched.step()
        if ema is not None:
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.max_steps - 1:
            print(f"step {step:5d}  loss {np.mean(running):.4f}  lr {lr_sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
            running = []
        if step + 1 == args.max_steps or (args.checkpointing_steps and (step + 1) % args.checkpointing_steps == 0):
            checkpoint(step + 1)
    timings["unet_train_s"] = time.time() - t0
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    unet.eval()
    text_encoder.eval()

    # ---- save (temp folder, then one rename), evaluate the saved folder ----
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_dir)
    t0 = time.time()
    images, entries, captions = evaluate_folder(tmp_dir, args, val_entries, val_caps)
    timings["eval_s"] = time.time() - t0
    scores, sample_groups = judge_groups(images, entries)
    correct = [result["all"] for result in scores]
    # the grid shows held-out scenes too: pick alternately from seen and held-out
    seen = [i for i, e in enumerate(entries) if not e["heldout"]]
    held = [i for i, e in enumerate(entries) if e["heldout"]]
    order = [i for pair in zip(seen, held) for i in pair] + seen[len(held):] + held[len(seen):]
    order = order[:args.num_grid]
    if order:  # --num_samples_eval 0 samples nothing: no grid
        sample_grid([images[i] for i in order], [captions[i] for i in order], [correct[i] for i in order],
                    os.path.join(tmp_dir, "samples.png"))
    timings.update(spent())
    metrics = {
        "samples": sample_groups,
        "vae_reconstruction": vae_groups,
        "clip_top1_last_batch": round(clip_acc, 4),
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.num_inference_steps,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "params": {"unet": n_unet, "text_encoder": n_text, "vae": sum(p.numel() for p in vae.parameters())},
        "args": vars(args),
    }
    with open(os.path.join(tmp_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    # Swap the finished folder in: a run killed before this point leaves any old teacher intact.
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the teacher is saved: nothing left to resume

    print(markdown_table(sample_groups, f"samples (g={args.guidance_scale})"))
    print(f"saved {out_dir}  ({timings['total_s']:.0f}s: vae {timings['vae_train_s']:.0f}s, "
          f"unet {timings['unet_train_s']:.0f}s, eval {timings['eval_s']:.0f}s)")
    return metrics


if __name__ == "__main__":
    main()
