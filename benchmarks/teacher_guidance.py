"""The toy teacher's judged attribute accuracy under several classifier-free guidance scales: the
same samples scripts/train_toy_teacher.py draws and judges at the end, once per scale.

    python -m benchmarks.teacher_guidance --teacher checkpoints/toy/teacher --data_dir checkpoints/toy/data \
        --guidance_scales 1.5,2,2.5,3,4
"""
import argparse
import os

import common
import errors
from data.coco import read_captions
from scripts import train_toy_teacher


def main(argv=None):
    teacher_defaults = train_toy_teacher.parse_args([])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True,
                   help="a folder scripts/train_toy_teacher.py wrote (a diffusers SD folder)")
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--guidance_scales", default="1.5,2,2.5,3,4")
    p.add_argument("--num_inference_steps", type=int, default=teacher_defaults.num_inference_steps)
    p.add_argument("--num_samples_eval", type=int, default=teacher_defaults.num_samples_eval,
                   help="val captions sampled and judged")
    p.add_argument("--image_size", type=int, default=teacher_defaults.image_size, help="the teacher's image size")
    p.add_argument("--seed", type=int, default=teacher_defaults.seed)
    args = p.parse_args(argv)
    try:
        scales = [float(s) for s in args.guidance_scales.split(",")]
    except ValueError:
        common.die(f"--guidance_scales {args.guidance_scales}: give numbers separated by commas, e.g. 1.5,2,3")
    if not os.path.isfile(os.path.join(args.teacher, "model_index.json")):
        common.die(f"--teacher {args.teacher}: no model_index.json there; pass the folder "
                   f"`python -m scripts.train_toy_teacher` wrote (e.g. checkpoints/toy/teacher)")

    ann = os.path.join(args.data_dir, "annotations", "captions_val2017.json")
    images_by_id, captions = read_captions(ann, f"generate the toy world with `python -m data.toy_world "
                                                f"--output_dir {args.data_dir}`")
    entries = list(images_by_id.values())
    print(common.machine_description())
    results = {}
    for text, scale in zip(args.guidance_scales.split(","), scales):
        images, judged, _ = train_toy_teacher.evaluate_folder(
            args.teacher, entries, captions, num_samples=args.num_samples_eval, guidance_scale=scale,
            num_inference_steps=args.num_inference_steps, image_size=args.image_size, seed=args.seed)
        _, groups = train_toy_teacher.judge(images, judged)
        results[scale] = groups
        table = common.accuracy_table(groups, f"guidance {text.strip()}")
        print(("\n" if len(results) > 1 else "") + table, flush=True)
    return results


if __name__ == "__main__":
    errors.run(main)
