"""Stage-1 step time on the CPU: fp32 against bf16, with SDPA's default kernel and with its math kernel.

The step is train_stage1's: the frozen SD (in the run's weight dtype) scores the encoder's z on cached
latents, backward into the encoder, AdamW (not through train_stage1.main, which always takes the
math kernel in bf16 on a CPU). The three settings take turns, so a drift of the
machine's speed reaches all of them alike; the median of each is printed, and which of them
train_stage1's `--mixed_precision auto` runs on this machine.

    python -m benchmarks.stage1_precision --sd_model_id checkpoints/toy/teacher
"""
import argparse
import contextlib
import time

import torch

import common
import errors
import train_stage1
from benchmarks import timing
from models.frozen_sd21 import FrozenSD
from models.vision_to_textemb import VisionToTextEmb

SETTINGS = {  # name: (weight dtype, the attention context of the step)
    "fp32": (torch.float32, contextlib.nullcontext),
    "bf16, SDPA's default kernel (flash)": (torch.bfloat16, contextlib.nullcontext),
    "bf16, math kernel (train_stage1)": (torch.bfloat16, lambda: common.attention_kernel("cpu", "bf16")),
}
AUTO_RUNS = {"no": "fp32", "bf16": "bf16, math kernel (train_stage1)"}  # what train_stage1 runs, by setting


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
    p.add_argument("--batch_size", type=int, default=None, help="default: the toy preset's")
    p.add_argument("--image_size", type=int, default=None, help="default: the toy preset's")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps) < 1:
        common.die("--rounds and --steps must be 1 or more")
    # The toy preset's encoder and batch: parsed, not copied.
    preset = train_stage1.parse_args(["--preset", "toy", "--data_dir", ".", "--output_dir", "."])
    if args.batch_size is not None:
        preset.batch_size = args.batch_size
    if args.image_size is not None:
        preset.image_size = args.image_size
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
    print(common.machine_description())
    medians = timing.print_medians(f"stage-1 step, batch {preset.batch_size}, {preset.image_size} px, "
                                   f"median of {args.rounds} turns of {args.steps} steps", times)
    auto, line = timing.auto_precision(cuda=False)
    print(f"{line}: train_stage1 runs the row {AUTO_RUNS.get(auto, auto)!r}")
    return dict(medians=medians, auto=auto)


if __name__ == "__main__":
    errors.run(main)
