"""Toy world: where is the shape of a held-out (colour, shape) pair lost? Linear probes.

A probe reads shape (and colour) off a representation of one-object scenes. It is trained on
train scenes, which hold seen pairs only, and tested on val scenes: seen pairs apart from held-out
ones. A representation that codes shape apart from colour lets the probe name a held-out pair's
shape; one that codes the pairs as conjunctions leaves it at chance (1/3).

    python benchmarks/heldout_probe.py --stage1_ckpt S1/vision_encoder_800.pt \
        --stage2_ckpt distilled=S2/captioner_1400.pt --stage2_ckpt no_stage1=BASE/captioner_1400.pt \
        --train_dir checkpoints/toy/data --val_dir checkpoints/toy/data
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from data.coco import CocoImagesOnlyDataset  # noqa: E402
from models.vlv import load_stage1, load_vlv  # noqa: E402


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
        (obj,) = info["scene"]["objects"]
        images.append(data[i]["pixel_values"])
        shapes.append(obj["shape"])
        colours.append(obj["colour"])
        heldout.append(bool(info.get("heldout")))
        if len(images) == limit:
            break
    return torch.stack(images), shapes, colours, torch.tensor(heldout)


@torch.no_grad()
def features(represent, images, batch=200):
    return torch.cat([represent(images[i:i + batch]).flatten(1).float() for i in range(0, len(images), batch)])


def probe_accuracy(train_x, train_y, test_x, test_y, steps=400, weight_decay=1e-3):
    """Multinomial logistic regression on standardised features (full batch, Adam)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(train_x.shape[1], int(train_y.max()) + 1, requires_grad=True)
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
    p.add_argument("--stage1_ckpt", required=True)
    p.add_argument("--stage2_ckpt", action="append", default=[], metavar="NAME=PATH",
                   help="a captioner trained on --stage1_ckpt; its prefix is probed (repeatable)")
    p.add_argument("--train_dir", default="checkpoints/toy/data")
    p.add_argument("--val_dir", default="checkpoints/toy/data")
    p.add_argument("--num_train", type=int, default=3000, help="one-object train scenes")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    encoder, sd, config, _ = load_stage1(args.stage1_ckpt, "cpu")
    encoder.eval()
    represent = {"stage-1 z": encoder, "stage-1 cond(z)": lambda x: sd.condition(encoder(x))}
    for spec in args.stage2_ckpt:
        name, sep, path = spec.partition("=")
        if not sep:
            common.die(f"--stage2_ckpt {spec}: give it as NAME=PATH")
        represent[f"stage-2 prefix ({name})"] = load_vlv(args.stage1_ckpt, path).prefix

    size = config["image_size"]
    train_images, train_shapes, train_colours, _ = one_object_scenes(args.train_dir, "train", size, args.num_train)
    val_images, val_shapes, val_colours, heldout = one_object_scenes(args.val_dir, "val", size, None)
    labels = [(train_shapes, val_shapes), (train_colours, val_colours)]  # the table's column order
    print(f"{len(train_images)} one-object train scenes; val: {int((~heldout).sum())} seen, "
          f"{int(heldout.sum())} held-out")
    print("| representation | shape: seen val | shape: held-out val | colour: seen val | colour: held-out val |")
    print("|---|---|---|---|---|")
    for name, fn in represent.items():
        train_x, val_x = features(fn, train_images), features(fn, val_images)
        cells = []
        for train_names, val_names in labels:
            classes = sorted(set(train_names))
            right = probe_accuracy(train_x, torch.tensor([classes.index(c) for c in train_names]),
                                   val_x, torch.tensor([classes.index(c) for c in val_names]))
            cells += [f"{right[~heldout].mean():.3f}", f"{right[heldout].mean():.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
