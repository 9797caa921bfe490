"""Teacher UNet training step: fp32 or bf16 autocast, with SDPA's attention (diffusers' default),
diffusers' plain-matmul AttnProcessor, or SDPA under its math kernel. The UNet is the pipeline's
teacher's (`python -m scripts.train_toy_teacher --preset toy`), on latents of their shape (8x8x8 for
the toy world's 32 px); the settings take turns, so a machine whose speed drifts slows them all
alike, and the best of the rounds is reported. Then the VAE's step (phase 1,
`train_toy_teacher.train_vae` itself on random 32 px images), fp32 against bf16 autocast, taking
turns likewise. Last, which rows the teacher's `--mixed_precision auto` runs on this machine.

    python -m benchmarks.teacher_step
"""
import argparse
import contextlib
import os
import time

import torch

import common
import errors
from benchmarks import timing
from models.toy_teacher import build_unet, build_vae
from scripts import train_toy_teacher
from scripts.train_toy_teacher import ints


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_size", type=int, default=None, help="the UNet's batch (default: the teacher's)")
    p.add_argument("--vae_batch_size", type=int, default=None, help="the VAE's batch (default: the teacher's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num_threads", type=int, default=0, help="0: torch's default")
    args = p.parse_args(argv)
    if min(args.steps, args.rounds) < 1:
        common.die("--steps and --rounds must be 1 or more")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    torch.manual_seed(0)
    teacher = train_toy_teacher.parse_args(["--preset", "toy"])  # the pipeline's teacher sizes
    c = teacher.latent_channels
    size = teacher.image_size // 2 ** (len(ints(teacher.vae_channels)) - 1)  # one halving per VAE block
    unet = build_unet(latent_channels=c, latent_size=size, channels=ints(teacher.unet_channels),
                      attention=ints(teacher.unet_attn), layers_per_block=teacher.unet_layers_per_block,
                      attention_head_dim=teacher.attention_head_dim, text_width=teacher.text_width,
                      text_time_embedding=teacher.text_time_embedding)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    b = args.batch_size or teacher.batch_size
    noisy, t = torch.randn(b, c, size, size), torch.randint(0, 1000, (b,))
    cond = torch.randn(b, teacher.max_length, teacher.text_width)       # the text encoder's [B,L,D]

    def step(bf16, math):
        # math: SDPA's math kernel for forward and backward, as common.Trainer's stages take in bf16
        with common.attention_kernel("cpu", "bf16") if math else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = unet(noisy, t, encoder_hidden_states=cond).sample
            pred.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    settings = [("fp32", False, AttnProcessor2_0, False), ("fp32", False, AttnProcessor, False),
                ("bf16 autocast", True, AttnProcessor2_0, False), ("bf16 autocast", True, AttnProcessor, False),
                ("bf16 autocast", True, AttnProcessor2_0, True)]
    best = [float("inf")] * len(settings)
    for _ in range(args.rounds):
        for i, (_, bf16, processor, math) in enumerate(settings):
            unet.set_attn_processor(processor())
            step(bf16, math)  # warm-up: kernel selection for this setting
            start = time.perf_counter()
            for _ in range(args.steps):
                step(bf16, math)
            best[i] = min(best[i], (time.perf_counter() - start) / args.steps)
    rows, unet_seconds = [], {}
    for (precision, _, processor, math), seconds in zip(settings, best):
        name = "SDPA (`AttnProcessor2_0`)" if processor is AttnProcessor2_0 else "plain matmuls (`AttnProcessor`)"
        if math:
            name = "SDPA, its math kernel (`common.attention_kernel`)"
        rows.append([precision, name, f"{seconds:.3f}"])
        unet_seconds[f"{precision}, {name}"] = seconds
    print(common.machine_description())
    print(f"teacher UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters), batch {b}, "
          f"best of {args.rounds} rounds of {args.steps} steps")
    print(common.markdown_table(["precision", "attention", "s per training step"], rows))

    vae_best = {}
    for _ in range(args.rounds):
        for precision in ("no", "bf16"):
            vae_args = train_toy_teacher.parse_args(
                ["--preset", "toy", "--vae_steps", str(args.steps + 1), "--log_every", "1000",
                 "--mixed_precision", precision]
                + (["--vae_batch_size", str(args.vae_batch_size)] if args.vae_batch_size else []))
            vae = build_vae(image_size=vae_args.image_size, channels=ints(vae_args.vae_channels),
                            latent_channels=vae_args.latent_channels)
            pixels = torch.randint(0, 256, (256, 3, vae_args.image_size, vae_args.image_size), dtype=torch.uint8)
            gen = torch.Generator().manual_seed(0)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its loss lines
                train_toy_teacher.train_vae(vae_args, vae, pixels, gen)       # warm-up
                vae.train().requires_grad_(True)
                start = time.perf_counter()
                train_toy_teacher.train_vae(vae_args, vae, pixels, gen)
            seconds = (time.perf_counter() - start) / vae_args.vae_steps
            vae_best[precision] = min(vae_best.get(precision, float("inf")), seconds)
    print(f"\nteacher VAE ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters), batch "
          f"{vae_args.vae_batch_size}, best of {args.rounds} rounds of {vae_args.vae_steps} steps")
    print(common.markdown_table(["precision", "s per training step"],
                                [["fp32" if k == "no" else "bf16 autocast", f"{s:.3f}"] for k, s in vae_best.items()]))

    auto, line = timing.auto_precision(cuda=False)  # the teacher trains on the CPU
    unet_row = "bf16 autocast, plain matmuls" if auto == "bf16" else "fp32, SDPA"
    print(f"\n{line}: scripts.train_toy_teacher runs the UNet row {unet_row!r} and the VAE row "
          f"{'bf16 autocast' if auto == 'bf16' else 'fp32'!r}")
    return dict(unet=unet_seconds, vae={"fp32" if k == "no" else "bf16 autocast": s for k, s in vae_best.items()},
                auto=auto)


if __name__ == "__main__":
    errors.run(main)
