"""Stage-1 step time with and without the VAE latent cache, measured in one run.

Each is train_stage1.main with the toy preset for two epochs (--epochs): with the cache, epoch 1
encodes every image once and the later epochs only read. The seconds are those the run itself
counts (summary.json: data and compute, no checkpoints or samples).

    python -m benchmarks.stage1_latent_cache --data_dir checkpoints/toy/data --sd_model_id checkpoints/toy/teacher
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile

import common
import errors
import train_stage1

TOY = common.PRESETS["toy"]["stage1"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--sd_model_id", default="checkpoints/toy/teacher")
    p.add_argument("--subset_ratio", type=float, default=0.16, help="of the train split")
    p.add_argument("--batch_size", type=int, default=TOY["batch_size"], help="the toy preset's")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image_size", type=int, default=TOY["image_size"], help="the toy preset's")
    common.add_precision_arg(p)
    args = p.parse_args(argv)
    if args.epochs < 2:
        common.die(f"--epochs {args.epochs}: give 2 or more (epoch 1 fills the cache, the later ones read it)")
    rows, seconds, ran = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for cache in (False, True):
            out = os.path.join(tmp, f"cache_{cache}")
            argv = ["--preset", "toy", "--data_dir", args.data_dir, "--sd_model_id", args.sd_model_id,
                    "--output_dir", out, "--subset_ratio", str(args.subset_ratio), "--epochs", str(args.epochs),
                    "--max_steps", "0", "--batch_size", str(args.batch_size), "--image_size", str(args.image_size),
                    "--mixed_precision", args.mixed_precision, "--validation_steps", "0",
                    "--num_validation_images", "1", "--num_inference_steps", "1",
                    "--checkpointing_steps", "100000", "--num_workers", "0",
                    "--cache_latents" if cache else "--no-cache_latents"]
            common.fresh_accelerator_state()
            with contextlib.redirect_stdout(sys.stderr):  # its progress is not the table
                train_stage1.main(argv)
            with open(os.path.join(out, "summary.json")) as f:
                times = json.load(f)["epoch_seconds_and_steps"]
            with open(os.path.join(out, "args.json")) as f:
                ran = json.load(f)["mixed_precision"]  # what auto resolved to
            per_step = [sec / steps for sec, steps in (times[k] for k in sorted(times, key=int))]
            seconds["on" if cache else "off"] = per_step
            rows.append(["on" if cache else "off"] + [f"{s:.3f}" for s in per_step])
    print(common.machine_description())
    print(f"stage-1 seconds per step, batch {args.batch_size}, {args.image_size} px, toy preset, "
          f"--mixed_precision {args.mixed_precision} (ran {ran})")
    print(common.markdown_table(["latent cache"] + [f"epoch {e + 1} (s/step)" for e in range(len(rows[0]) - 1)],
                                rows))
    return dict(seconds_per_step=seconds, mixed_precision=ran)


if __name__ == "__main__":
    errors.run(main)
