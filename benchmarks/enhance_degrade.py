"""Does the degrade flow win back what a corruption costs the captions? (toy world)

Val images are corrupted with each kind of train_flowmatching's degradations (a fixed strength
per image), captioned without an enhancer, with the ridge map fitted on the flow's own pairs, and
with the flow; the cells are the share of seen val images whose caption names every attribute
right. "won back" = (enhanced - none) / (clean - none) of each row: the share of the loss
recovered. Goal: the flow wins back at least half on average and costs at most 1 point on clean
images. Then the mean cos(z the captioner reads, clean z) of each cell (what the enhancer does to
z, whatever the captioner makes of it), and what each enhancer adds to the time of captioning.

    python -m benchmarks.enhance_degrade --run checkpoints/toy       # RUN/stage1, stage2, flow_degrade, data
"""
import argparse
import os
import sys
import time

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset, image_transform, load_rgb
from data.degrade import DEGRADATIONS, degrade
from data import toy_world
from data.toy_world import attribute_scores, grouped_accuracy, parse_caption



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy", help="the toy pipeline's output folder")
    p.add_argument("--flow", default=None, help="default: RUN/flow_degrade (its newest flow)")
    p.add_argument("--num_samples", type=int, default=None, help="first N val images (default: all)")
    p.add_argument("--val_world", type=int, default=None,
                   help="N: read a fresh toy val split of N images (generated once into RUN/val_world_N, "
                        "another seed than the run's data) instead of RUN/data's 200: finer than 1/131 a cell")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--enhancer_steps", type=int, default=8)
    p.add_argument("--enhancer_solver", default="euler")
    p.add_argument("--enhancer_t0", type=float, default=0.0,
                   help="start the flow's ODE at t0 (0: from the corrupted z)")
    p.add_argument("--num_beams", type=int, default=3)
    return p.parse_args(argv)


def seen_all_right(captions, infos):
    results = [attribute_scores(parse_caption(c), info["scene"]) for c, info in zip(captions, infos)]
    return grouped_accuracy(results, infos)["seen"]["all"]["accuracy"]


def val_data(args):
    """The data folder whose val split the table reads (--val_world: generated on first use)."""
    return os.path.join(args.run, "data") if args.val_world is None else toy_world.val_world(args.run, args.val_world)


def main(argv=None):
    args = parse_args(argv)
    flow_dir = args.flow or os.path.join(args.run, "flow_degrade")
    for need in ("stage1", "stage2", "data"):
        if not os.path.isdir(os.path.join(args.run, need)):
            common.die(f"--run {args.run} has no {need}/; run scripts/toy_pipeline.sh first (OUT={args.run})")
    if not os.path.isdir(flow_dir) and not os.path.isfile(flow_dir):
        common.die(f"no degrade flow at {flow_dir}; train one with train_flowmatching.py --mode degrade")
    torch.manual_seed(0)
    vlv = common.load_vlv(os.path.join(args.run, "stage1"), os.path.join(args.run, "stage2"))
    dataset = CocoImageCaptionDataset(val_data(args), split="val", image_size=vlv.image_size)
    ids = [i for i in dataset.image_ids if dataset.images_info[i].get("scene")][:args.num_samples]
    infos = [dataset.images_info[i] for i in ids]
    transform = image_transform(vlv.image_size)
    clean = torch.stack([transform(load_rgb(dataset.image_path(i))) for i in ids])
    enhancers = {}
    for name, spec in (("none", "none"), ("ridge", os.path.join(flow_dir, "baseline.pt")), ("flow", flow_dir)):
        flags = common.enhancer_flags(spec, enhancer_steps=args.enhancer_steps, enhancer_t0=args.enhancer_t0,
                                      enhancer_solver=args.enhancer_solver)
        enhancers[name] = common.load_enhancer(flags, vlv)
    decoding = dict(num_beams=args.num_beams)

    def batches(images):
        return [images[s:s + args.batch_size] for s in range(0, len(images), args.batch_size)]

    @torch.no_grad()
    def captions(images, name):
        """-> (the captions, the z they were read from: after the enhancer [N,L,D])."""
        vlv.enhancer = enhancers[name]
        out, zs = [], []
        for b in batches(images):
            z, cond = vlv.embed(b)
            out += vlv.captioner.generate(vlv.captioner_input(z, cond), **decoding)
            zs.append(z)
        return out, torch.cat(zs)

    with torch.no_grad():
        clean_z = torch.cat([vlv.encoder(b) for b in batches(clean)])

    rows, table, seconds, cosines = {}, [], {}, []
    for kind in ["clean"] + list(DEGRADATIONS):
        images = clean if kind == "clean" else torch.stack([degrade(x, kind, int(i)) for x, i in zip(clean, ids)])
        rows[kind], cells = {}, [kind]
        for name in enhancers:
            start = time.perf_counter()
            texts, z = captions(images, name)
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            rows[kind][name] = seen_all_right(texts, infos)
            cells.append(f"{torch.nn.functional.cosine_similarity(z.flatten(1), clean_z.flatten(1)).mean():.4f}")
        cosines.append(cells)
        print(f"{kind}: " + ", ".join(f"{n} {v:.3f}" for n, v in rows[kind].items()), file=sys.stderr, flush=True)
    won = {name: [] for name in ("ridge", "flow")}
    for kind, r in rows.items():
        lost = rows["clean"]["none"] - r["none"]
        cells = [kind] + [f"{r[n]:.3f}" for n in enhancers]
        for name in won:
            share = (r[name] - r["none"]) / lost if kind != "clean" and lost > 0 else None
            if share is not None:
                won[name].append(share)
            cells.append("-" if share is None else f"{share:.2f}")
        table.append(cells)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    means = {n: mean([rows[k][n] for k in DEGRADATIONS]) for n in enhancers}
    pooled = {n: (means[n] - means["none"]) / (rows["clean"]["none"] - means["none"])
              if rows["clean"]["none"] > means["none"] else float("nan") for n in won}
    table.append(["mean of the corruptions (won back: mean of the rows' shares)",
                  *[f"{means[n]:.3f}" for n in enhancers], *[f"{mean(won[n]):.2f}" for n in won]])
    table.append(["won back of the mean loss", "", "", "", *[f"{pooled[n]:.2f}" for n in won]])
    print(common.machine_description())
    print(f"captions' seen all-right accuracy on {len(ids)} toy val images ({sum(not i['heldout'] for i in infos)} "
          f"seen), beam {args.num_beams}, flow {args.enhancer_steps} {args.enhancer_solver} steps "
          f"from t0 {args.enhancer_t0:g}")
    print(common.markdown_table(["val images", "no enhancer", "ridge map", "flow", "ridge won back", "flow won back"],
                                table))
    print()
    print(common.markdown_table(["val images", "cos(z, clean z): no enhancer", "ridge map", "flow"], cosines))
    per_image = {n: 1000 * sum(s) / (len(s) * len(ids)) for n, s in seconds.items()}
    print()
    print(common.markdown_table(["enhancer", "ms per image (encoder + enhancer + captioner)", "cost over captioning"],
                                [[n, f"{ms:.2f}", "-" if n == "none" else f"{ms / per_image['none'] - 1:+.1%}"]
                                 for n, ms in per_image.items()]))
    return rows


if __name__ == "__main__":
    errors.run(main)
