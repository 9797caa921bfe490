"""Stage-2 step time on the CPU, through train_stage2.main itself: fp32 against bf16, and AdamW's
per-parameter loop against its fused kernel (common.build_optimization's since 2026-12-02).

Each turn trains the toy preset's stage 2 as the pipeline runs it (posterior_ref, the LM and the
encoder trained) for a few steps from a pipeline run's stage 1 and reads the seconds the run
itself counts (summary.json: data and compute, no checkpoints or samples). The settings take
turns, so a drift of the machine's speed reaches all of them alike; the median of each is printed.

    python benchmarks/stage2_step.py --run checkpoints/toy
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
from stage1_precision import print_medians  # noqa: E402  (this folder is on sys.path)

SETTINGS = {  # name: (--mixed_precision, AdamW fused)
    "fp32, AdamW loop (until 2026-12-02)": ("no", False),
    "bf16, AdamW loop": ("bf16", False),
    "bf16, AdamW fused (the default now)": ("bf16", True),
}


def seconds_per_step(run, stage1_ckpt, out, precision, fused, steps, batch_size):
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state()  # as in a new process: accelerate keeps one mixed precision per process
    GradientState._reset_state()
    real = torch.optim.AdamW
    adamw = mock.patch("torch.optim.AdamW", lambda *a, **k: real(*a, **{**k, "fused": fused}))
    with adamw, open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        train_stage2.main(["--preset", "toy", "--data_dir", f"{run}/data", "--llm", f"{run}/lm",
                           "--stage1_ckpt", stage1_ckpt, "--output_dir", out, "--batch_size", str(batch_size),
                           "--finetune_lm", "--finetune_encoder", "--mixed_precision", precision,
                           "--max_steps", str(steps), "--checkpointing_steps", str(steps),
                           "--validation_steps", "0", "--num_validation_images", "1"])
    with open(os.path.join(out, "summary.json")) as f:
        seconds, n = json.load(f)["epoch_seconds_and_steps"]["0"]
    return seconds / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy", help="a toy pipeline's OUT: data/, lm/, stage1/")
    p.add_argument("--rounds", type=int, default=3, help="turns of each setting")
    p.add_argument("--steps", type=int, default=30, help="steps per turn")
    p.add_argument("--batch_size", type=int, default=common.PRESETS["toy"]["stage2"]["batch_size"])
    args = p.parse_args(argv)
    stage1_ckpt = common.resolve_resume("latest", f"{args.run}/stage1", train_stage1.CKPT_PREFIX)
    if stage1_ckpt is None:
        common.die(f"no {train_stage1.CKPT_PREFIX}_*.pt in {args.run}/stage1; pass --run a toy pipeline's OUT")
    times = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, (precision, fused) in SETTINGS.items():
            with tempfile.TemporaryDirectory() as out:
                times[name].append(seconds_per_step(args.run, stage1_ckpt, out, precision, fused, args.steps,
                                                    args.batch_size))
    print_medians(f"toy stage-2 step (batch {args.batch_size}, posterior_ref, LM and encoder trained), "
                  f"{torch.get_num_threads()} threads, median of {args.rounds} turns of {args.steps} steps", times)


if __name__ == "__main__":
    main()
