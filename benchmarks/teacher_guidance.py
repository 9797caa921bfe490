"""The toy teacher's judged attribute accuracy under several classifier-free guidance scales: the
same samples train_teacher.py draws and judges at the end, once per scale.

    python benchmarks/teacher_guidance.py --teacher checkpoints/toy/teacher --data_dir checkpoints/toy/data \
        --guidance_scales 1.5,2,2.5,3,4
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_teacher  # noqa: E402
from data.toy_world import load_split  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="a folder train_teacher.py wrote")
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--guidance_scales", default="1.5,2,2.5,3,4")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--num_samples_eval", type=int, default=200)
    args = p.parse_args(argv)

    entries, captions = load_split(args.data_dir, "val")
    for scale in args.guidance_scales.split(","):
        sample_args = train_teacher.parse_args([
            "--guidance_scale", scale, "--num_inference_steps", str(args.num_inference_steps),
            "--num_samples_eval", str(args.num_samples_eval)])
        images, judged, _ = train_teacher.evaluate_folder(args.teacher, sample_args, entries, captions)
        _, groups = train_teacher.judge_groups(images, judged)
        print(train_teacher.markdown_table(groups, f"guidance {scale}"), flush=True)


if __name__ == "__main__":
    main()
