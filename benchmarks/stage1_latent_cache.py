"""Stage-1 step time with and without the VAE latent cache, measured in one run.

Two epochs each: with the cache, epoch 1 encodes every image once and epoch 2 only reads.
    python benchmarks/stage1_latent_cache.py --data_dir checkpoints/toy/data --sd_model_id checkpoints/toy/teacher
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_stage1  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--sd_model_id", default="checkpoints/toy/teacher")
    p.add_argument("--subset_ratio", type=float, default=0.16, help="of the train split")
    p.add_argument("--batch_size", type=int, default=128, help="the toy preset's")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cache in (False, True):
            out = os.path.join(tmp, f"cache_{cache}")
            argv = ["--preset", "toy", "--data_dir", args.data_dir, "--sd_model_id", args.sd_model_id,
                    "--output_dir", out, "--subset_ratio", str(args.subset_ratio), "--epochs", "2",
                    "--max_steps", "0", "--batch_size", str(args.batch_size), "--validation_steps", "0",
                    "--num_validation_images", "1", "--num_inference_steps", "1",
                    "--checkpointing_steps", "100000", "--num_workers", "0"]
            train_stage1.main(argv + (["--cache_latents"] if cache else ["--no-cache_latents"]))
            times = json.load(open(os.path.join(out, "summary.json")))["epoch_seconds_and_steps"]
            rows.append((cache, [times[k] for k in sorted(times, key=int)]))
    print(f"stage-1 seconds per step, batch {args.batch_size}, toy preset")
    print("| latent cache | epoch 1 (s/step) | epoch 2 (s/step) |")
    print("|---|---|---|")
    for cache, epochs in rows:
        cells = [f"{sec / steps:.3f}" for sec, steps in epochs]
        print(f"| {'on' if cache else 'off'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
