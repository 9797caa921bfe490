"""Stage-1 step time on the CPU: fp32 against bf16, with SDPA's default kernel and with its math kernel.

The step is train_stage1's: the frozen SD (in the run's weight dtype) scores the encoder's z on cached
latents, backward into the encoder, AdamW (not through train_stage1.main, which always takes the
math kernel in bf16 on a CPU). The three settings take turns, so a drift of the
machine's speed reaches all of them alike; the median of each is printed.
    python benchmarks/stage1_precision.py --sd_model_id checkpoints/toy/teacher
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train_stage1  # noqa: E402
from models.frozen_sd21 import FrozenSD  # noqa: E402
from models.vision_to_textemb import VisionToTextEmb  # noqa: E402

SETTINGS = {  # name: (weight dtype, the attention context of the step)
    "fp32": (torch.float32, contextlib.nullcontext),
    "bf16, SDPA's default kernel (flash)": (torch.bfloat16, contextlib.nullcontext),
    "bf16, math kernel (train_stage1)": (torch.bfloat16, lambda: common.attention_kernel("cpu", "bf16")),
}


def make_step(sd, attention, preset):
    """One stage-1 step of a fresh toy encoder on the frozen `sd` (its weight dtype sets the precision)."""
    dtype = sd.unet.dtype
    torch.manual_seed(0)
    encoder = VisionToTextEmb(sd.seq_len, sd.embed_dim, preset.backbone, "none",
                              width=preset.encoder_width, num_layers=preset.encoder_layers)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-3)
    images = torch.rand(preset.batch_size, 3, preset.image_size, preset.image_size)
    mean, std = sd.latent_dist(images)  # the latent cache's posterior

    def step():
        with attention():
            # As accelerate runs it: the encoder's forward under autocast, its output back in fp32;
            # the frozen SD outside autocast, in its own weight dtype.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                z = encoder(images)
            loss = sd.loss(sd.sample_latents(mean, std), z.float())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sd_model_id", default="checkpoints/toy/teacher")
    p.add_argument("--rounds", type=int, default=5, help="turns of each setting")
    p.add_argument("--steps", type=int, default=4, help="timed steps per turn (after one warm-up)")
    args = p.parse_args(argv)
    # The toy preset's encoder and batch: parsed, not copied.
    preset = train_stage1.parse_args(["--preset", "toy", "--data_dir", ".", "--output_dir", "."])
    sds = {dtype: FrozenSD.from_pretrained(args.sd_model_id, dtype=dtype)  # one per precision, shared
           for dtype, _ in SETTINGS.values()}
    steps = {name: make_step(sds[dtype], attention, preset) for name, (dtype, attention) in SETTINGS.items()}
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            step()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    print_medians(f"stage-1 step, batch {preset.batch_size}, {preset.image_size} px, {torch.get_num_threads()} "
                  f"threads, median of {args.rounds} turns of {args.steps} steps", times)


def print_medians(title, times):
    """times {setting: [seconds a step, one per turn]} -> a markdown table of the medians, each
    against the first setting's."""
    base = statistics.median(next(iter(times.values())))
    print(title)
    print(f"| setting | s/step | against {next(iter(times))} |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
