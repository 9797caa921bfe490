"""Check that a run can generate: its checkpoints, the installed versions, the device, and one
test generation (the seed's inference_setup.py). Every check prints one line, ok or FAIL with the
fix; the exit status is 0 only when all pass.

    python doctor.py --run_dir checkpoints/toy
    python doctor.py --stage1_ckpt ... --stage2_ckpt ... --prior checkpoints/prior --device cuda
"""
import argparse
import os
import platform
import sys
import time

import torch

import common
from errors import BadInput

TRAINS = {"stage1": "python train_stage1.py ... --output_dir {}",
          "stage2": "python train_stage2.py --stage1_ckpt ... --output_dir {}",
          "prior": "python train_flowmatching.py --mode prior --stage1_ckpt ... --stage2_ckpt ... --output_dir {}"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_generator_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_inference_steps", type=int, default=20, help="SD steps of the test generation")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def report(ok, what, detail):
    print(f"{'ok  ' if ok else 'FAIL'}  {what}: {detail}", flush=True)
    return ok


def checkpoint(part, flag, prefix, path):
    """One line for a checkpoint: the file found, or which file to pass."""
    if path is None:
        return report(False, part, f"not given; pass {flag} or --run_dir")
    if part == "prior" and os.path.isfile(path):
        return report(True, part, path)
    if os.path.isfile(path):
        return report(True, part, path)
    found = common.list_checkpoints(path, prefix)
    if found:
        return report(True, part, found[-1])
    return report(False, part, f"no {prefix}_<step>.pt in {path}; train it ({TRAINS[part].format(path)}) "
                               f"or pass {flag} (a {prefix}_<step>.pt or its run folder)")


def main(argv=None):
    args = parse_args(argv)
    run = args.run_dir
    results = [report(sys.version_info[:2] >= (3, 10), "python", platform.python_version())]
    import diffusers
    import transformers
    results.append(report(True, "packages", f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}), "
                                            f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"))
    if args.device.startswith("cuda"):
        ok = torch.cuda.is_available()
        results.append(report(ok, "device", f"{torch.cuda.get_device_name(0)}" if ok else
                              "no CUDA GPU visible (CUDA_VISIBLE_DEVICES, the driver); pass --device cpu"))
    else:
        results.append(report(True, "device", f"cpu ({common.machine_description()}); "
                                              f"{'a CUDA GPU is there: pass --device cuda' if torch.cuda.is_available() else 'no CUDA GPU: generation runs on the CPU'}"))
    if run is not None and not os.path.isdir(run):
        results.append(report(False, "run folder", f"{run} does not exist; pass the folder a pipeline wrote "
                                                    f"(e.g. checkpoints/toy)"))
        run = None
    paths = dict(stage1=args.stage1_ckpt or (run and os.path.join(run, "stage1")),
                 stage2=args.stage2_ckpt or (run and os.path.join(run, "stage2")),
                 prior=args.prior or (run and common.prior_path(run)))
    for part, flag, prefix in (("stage1", "--stage1_ckpt", "vision_encoder"), ("stage2", "--stage2_ckpt", "captioner"),
                               ("prior", "--prior", "flow")):
        results.append(checkpoint(part, flag, prefix, paths[part]))
    if all(results):
        try:
            gen = common.load_generator(None, paths["stage1"], paths["stage2"], paths["prior"], args.device,
                                        ode_steps=args.ode_steps, solver=args.solver,
                                        num_inference_steps=args.num_inference_steps)
            results.append(report(True, "checkpoints load together", "encoder, SD, captioner and prior agree"))
            t = time.perf_counter()
            image, caption, meta = gen.generate_with_metadata(args.seed)
            seconds = time.perf_counter() - t
            results.append(report(bool(caption.strip()), "test generation",
                                  f"seed {args.seed} -> {image.size[0]}x{image.size[1]} image, caption "
                                  f"{caption!r} in {seconds:.2f} s on {args.device}"
                                  + ("" if caption.strip() else "; the caption is empty: train stage 2 longer")))
        except BadInput as e:
            results.append(report(False, "checkpoints load together", str(e)))
    print(f"{sum(results)} of {len(results)} checks passed" + ("" if all(results) else "; fix the FAIL lines above"))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
