"""Stage-2 step time on the CPU, through train_stage2.main itself: fp32 against bf16.

Each turn trains the toy preset's stage 2 as the pipeline runs it (posterior_ref, the LM and the
encoder trained) for a few steps from a pipeline run's stage 1 and reads the seconds the run
itself counts (summary.json: data and compute, no checkpoints or samples). The settings take
turns, so a drift of the machine's speed reaches all of them alike; the median of each is printed,
and which of them `--mixed_precision auto` runs on this machine.

    python -m benchmarks.stage2_step --run checkpoints/toy
    python -m benchmarks.stage2_step --run checkpoints/toy --captioner blip --settings fp32
"""
import argparse
import contextlib
import json
import os
import tempfile

import common
import errors
import train_stage2
from benchmarks import timing

SETTINGS = {"fp32": "no", "bf16": "bf16"}  # name: --mixed_precision


def seconds_per_step(run, out, precision, steps, batch_size, num_workers, captioner="prefix"):
    common.fresh_accelerator_state()  # accelerate keeps one mixed precision per process
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        train_stage2.main(["--preset", "toy", "--captioner", captioner, "--data_dir", f"{run}/data",
                           "--llm", f"{run}/lm", "--stage1_ckpt", f"{run}/stage1", "--output_dir", out,
                           "--batch_size", str(batch_size),
                           "--mixed_precision", precision, "--num_workers", str(num_workers),
                           "--max_steps", str(steps), "--checkpointing_steps", str(steps),
                           "--validation_steps", "0", "--num_validation_images", "1"])
    with open(os.path.join(out, "summary.json")) as f:
        epochs = json.load(f)["epoch_seconds_and_steps"].values()
    return sum(s for s, _ in epochs) / sum(n for _, n in epochs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy", help="a toy pipeline's OUT: data/, lm/, stage1/")
    p.add_argument("--rounds", type=int, default=3, help="turns of each setting")
    p.add_argument("--steps", type=int, default=30, help="steps per turn")
    p.add_argument("--batch_size", type=int, default=common.PRESETS["toy"]["stage2"]["batch_size"])
    p.add_argument("--captioner", default="prefix", choices=sorted(common.CAPTIONERS),
                   help="the toy preset's captioner of that kind (blip: from the MiniLM; evcap: no memory)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"of {','.join(SETTINGS)}")
    p.add_argument("--num_workers", type=int, default=train_stage2.build_parser().get_default("num_workers"),
                   help="data-loading processes (train_stage2's default, as the pipeline runs it)")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps) < 1:
        common.die("--rounds and --steps must be 1 or more")
    settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown or not settings:
        wrong = f"unknown {', '.join(unknown)}" if unknown else "none given"
        common.die(f"--settings {args.settings}: {wrong}; use some of {','.join(SETTINGS)}")
    for part in ("data", "lm", "stage1"):
        if not os.path.isdir(os.path.join(args.run, part)):
            common.die(f"--run {args.run} has no {part}/; pass a toy pipeline's OUT (bash scripts/toy_pipeline.sh "
                       f"writes checkpoints/toy)")
    times = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name in settings:
            with tempfile.TemporaryDirectory() as out:
                times[name].append(seconds_per_step(args.run, out, SETTINGS[name], args.steps, args.batch_size,
                                                    args.num_workers, args.captioner))
    print(common.machine_description())
    medians = timing.print_medians(f"toy stage-2 step, {args.captioner} captioner (batch {args.batch_size}, "
                                   f"posterior_ref, LM and encoder trained), median of {args.rounds} turns of "
                                   f"{args.steps} steps", times)
    auto, line = timing.auto_precision()
    print(f"{line}: train_stage2 runs the row {'bf16' if auto == 'bf16' else 'fp32'!r}")
    return dict(medians=medians, auto=auto)


if __name__ == "__main__":
    errors.run(main)
