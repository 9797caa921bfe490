"""Toy world: where is the shape of a held-out (colour, shape) pair lost? Linear probes.

A probe reads shape (and colour) off a representation of one-object scenes. It is trained on
train scenes, which hold seen pairs only, and tested on val scenes: seen pairs apart from held-out
ones. A representation that codes shape apart from colour lets the probe name a held-out pair's
shape; one that codes the pairs as conjunctions leaves it at chance (1/3).

    python -m benchmarks.heldout_probe --stage1_ckpt checkpoints/toy/stage1 \
        --stage2_ckpt distilled=checkpoints/toy/stage2 --train_dir checkpoints/toy/data --val_dir checkpoints/toy/data

A second --stage2_ckpt NAME=PATH adds a row per captioner, e.g. the baseline without stage 1
(`python train_stage2.py --preset toy --stage1_ckpt checkpoints/toy/stage1 --reinit_encoder
--output_dir checkpoints/toy/stage2_no_stage1`) as --stage2_ckpt no_stage1=checkpoints/toy/stage2_no_stage1.
"""
import argparse

import torch
import torch.nn.functional as F

import common
import errors
from data.coco import CocoImagesOnlyDataset


def one_object_scenes(data_dir, split, image_size, limit):
    """(images [N,3,S,S], shapes, colours, heldout flags) of the split's one-object scenes."""
    data = CocoImagesOnlyDataset(data_dir, split=split, image_size=image_size)
    images, shapes, colours, heldout = [], [], [], []
    for i, image_id in enumerate(data.image_ids):
        info = data.images_info[image_id]
        if "scene" not in info:
            common.die(f"{data_dir}: not a toy world (its images have no scene); "
                       f"generate one with `python -m data.toy_world`")
        if len(info["scene"]["objects"]) != 1:
            continue
        item = data[i]
        if item is None:  # unreadable (the dataset warned)
            continue
        (obj,) = info["scene"]["objects"]
        images.append(item["pixel_values"])
        shapes.append(obj["shape"])
        colours.append(obj["colour"])
        heldout.append(bool(info.get("heldout")))
        if len(images) == limit:
            break
    if not images:
        common.die(f"{data_dir}: split {split} has no one-object scene to probe")
    return torch.stack(images), shapes, colours, torch.tensor(heldout)


@torch.no_grad()
def features(represent, images, batch=200):
    return torch.cat([represent(images[i:i + batch]).flatten(1).float() for i in range(0, len(images), batch)])


def probe_accuracy(train_x, train_y, test_x, test_y, num_classes, steps=400, weight_decay=1e-3):
    """Multinomial logistic regression on standardised features (full batch, Adam)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(train_x @ w + b, train_y) + weight_decay * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((test_x @ w + b).argmax(1) == test_y).float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1_ckpt", required=True, help="vision_encoder_{step}.pt, or the stage-1 run's folder")
    p.add_argument("--stage2_ckpt", action="append", default=[], metavar="NAME=PATH",
                   help="a captioner trained on --stage1_ckpt (a checkpoint or its run's folder); its "
                        "prefix is probed (repeatable)")
    p.add_argument("--train_dir", default="checkpoints/toy/data")
    p.add_argument("--val_dir", default="checkpoints/toy/data")
    p.add_argument("--num_train", type=int, default=3000, help="one-object train scenes")
    p.add_argument("--probe_steps", type=int, default=400, help="Adam steps of each probe")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    captioners = {}
    for spec in args.stage2_ckpt:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            common.die(f"--stage2_ckpt {spec}: give it as NAME=PATH")
        captioners[name] = path

    encoder, sd, config, _ = common.load_stage1(args.stage1_ckpt, "cpu")
    encoder.eval()
    represent = {"stage-1 z": encoder, "stage-1 cond(z)": lambda x: sd.condition(encoder(x))}
    for name, path in captioners.items():
        represent[f"stage-2 prefix ({name})"] = common.load_vlv(args.stage1_ckpt, path).prefix

    size = config["image_size"]
    train_images, train_shapes, train_colours, _ = one_object_scenes(args.train_dir, "train", size, args.num_train)
    val_images, val_shapes, val_colours, heldout = one_object_scenes(args.val_dir, "val", size, None)
    labels = [(train_shapes, val_shapes), (train_colours, val_colours)]  # the table's column order
    print(common.machine_description())
    print(f"{len(train_images)} one-object train scenes; val: {int((~heldout).sum())} seen, "
          f"{int(heldout.sum())} held-out")
    header = ["representation", "shape: seen val", "shape: held-out val", "colour: seen val", "colour: held-out val"]
    rows, results = [], {}
    for name, fn in represent.items():
        train_x, val_x = features(fn, train_images), features(fn, val_images)
        cells = []
        for train_names, val_names in labels:
            # a val class the train scenes lack can still be named wrong, so it has a column too
            classes = sorted(set(train_names) | set(val_names))
            right = probe_accuracy(train_x, torch.tensor([classes.index(c) for c in train_names]),
                                   val_x, torch.tensor([classes.index(c) for c in val_names]),
                                   len(classes), steps=args.probe_steps)
            cells += [right[~heldout].mean().item() if (~heldout).any() else None,
                      right[heldout].mean().item() if heldout.any() else None]
        results[name] = dict(zip(header[1:], cells))
        rows.append([name] + ["-" if c is None else f"{c:.3f}" for c in cells])
    print(common.markdown_table(header, rows), flush=True)
    return results


if __name__ == "__main__":
    errors.run(main)
