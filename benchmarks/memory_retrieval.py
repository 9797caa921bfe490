"""Toy world: how often does EVCap's visual-name memory hand an image its right names? By key space.

The memory (scripts/build_memory.py) keys each rendered image of a (colour, shape) name by an
encoder; an image's names are those of its nearest keys. This benchmark keys the same memory
images by stage 1's encoder (what the memory file holds) and by each fine-tuned stage-2 encoder
given (what train_stage2.py --captioner evcap --finetune_encoder re-keys the memory with), and
scores retrieval on a fresh toy val split: the nearest name of one-object scenes, and both names
of two-object scenes among the two nearest, with the query pooled over z's tokens (the memory's
key, EVCap's retrieval here) or searched token by token (EVCap searches each of its 32 query outputs).
A row of region views for each encoder (--regions N split lines an axis, NameMemory.retrieve_regions: two
names where two views cut between two objects match the memory better than the whole image) reads its
memory as `train_stage2.py --memory_regions N` does; its count of names is the rule's, not the scene's.
With --pair_images N a last row keys stage 1's memory plus N two-object images of every pair of names
(data.toy_world.pair_scenes, both names on each key) and reads the names of the nearest key: the count
of names then comes from the memory, not from the scene.

    python -m benchmarks.memory_retrieval --run checkpoints/toy --stage2_ckpt evcap_ft=checkpoints/toy/captioners/evcap_ft
    python -m benchmarks.memory_retrieval --run checkpoints/toy --pair_images 64

RUN holds stage1/, memory_images/ (python -m data.toy_world --memory_dir) and gets val_world_N.
"""
import argparse
import os

import torch
import torch.nn.functional as F

import common
import errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy", help="the pipeline's folder (stage1/, memory_images/)")
    p.add_argument("--stage2_ckpt", action="append", default=[],
                   help="NAME=PATH of a stage-2 run that fine-tuned its encoder: a row keyed by it (repeatable)")
    p.add_argument("--val_world", type=int, default=1000, help="images of the fresh val split")
    p.add_argument("--space", default="cond", choices=["cond", "z"], help="the memory's space")
    p.add_argument("--regions", type=int, default=3,
                   help="N: a row of region views for each encoder, N split lines an axis (0: none)")
    p.add_argument("--pair_images", type=int, default=0,
                   help="N: add a row whose memory also holds N two-object images of every pair of names")
    return p.parse_args(argv)


def grouped(right, truths, heldout):
    """right[i]: image i's names found -> {(count, held-out): (accuracy, n)}, by its number of names."""
    out = {}
    for count in (1, 2):
        for held in (False, True):
            sel = [i for i, t in enumerate(truths) if len(t) == count and heldout[i] == held]
            out[count, held] = (sum(right[i] for i in sel) / len(sel) if sel else float("nan"), len(sel))
    return out


@torch.no_grad()
def encoded(encoder, sd, images_dir, val_images, space):
    """-> (the memory images' keys [M,D] by encoder, L2-normalised; their names [M]; the val images' tokens
    [N,L,D] in the memory's space)."""
    from data.coco import image_transform
    from scripts.build_memory import memory_keys
    keys, names, _ = memory_keys(encoder, sd, images_dir, space, image_transform(val_images.shape[-1]), desc="keys")
    x = torch.cat([encoder(val_images[s:s + 256]) for s in range(0, len(val_images), 256)])
    return F.normalize(keys, dim=-1), names, (sd.condition(x) if space == "cond" else x).float()


def scores(keys, names, x, truths, heldout):
    """-> {(query, count, held-out): (accuracy, n)} for one encoder's keys and val tokens x."""
    from models.evcap import memory_key
    vocab = sorted(set(names))
    owner = torch.tensor([vocab.index(n) for n in names])
    pooled = memory_key(x) @ keys.T                                                 # [N,M]
    tokens = torch.einsum("nld,md->nlm", F.normalize(x, dim=-1), keys).amax(1)       # [N,M]: best token per key

    def ranked(sims):  # [N,M] -> per image, its names by their best key, most similar first
        best = torch.full((len(sims), len(vocab)), -2.0).scatter_reduce(1, owner.expand(len(sims), -1), sims, "amax")
        return [[vocab[j] for j in row] for row in best.argsort(1, descending=True).tolist()]

    out = {}
    for query, sims in (("pooled", pooled), ("per token", tokens)):
        names_of = ranked(sims)
        right = [set(names_of[i][:len(t)]) == t for i, t in enumerate(truths)]
        out.update({(query, *group): v for group, v in grouped(right, truths, heldout).items()})
    return out


@torch.no_grad()
def region_scores(encoder, sd, keys, names, images, x, regions, truths, heldout, space):
    """-> {(count, held-out): (accuracy, n)}: the names of NameMemory.retrieve_regions (regions lines an
    axis; one name a region) right, as a set, for each val image (images [N,3,S,S], their tokens x)."""
    from models.evcap import NameMemory
    memory = NameMemory(keys, names, topn=1, regions=regions)
    def embed(views):
        z = encoder(views)
        return (sd.condition(z) if space == "cond" else z).float()
    found = []
    for s in range(0, len(images), 64):
        found += memory.names_by_regions(images[s:s + 64], x[s:s + 64], embed)
    return grouped([set(f) == t for f, t in zip(found, truths)], truths, heldout)


@torch.no_grad()
def pair_memory_scores(encoder, sd, keys, names, x, per_pair, image_size, truths, heldout, space):
    """-> {(count, held-out): (accuracy, n)}: the memory (keys, names, by encoder) plus per_pair two-object
    images of every pair of names, each keyed with both its names; a scene (val tokens x) gets the names
    of its nearest key (pooled)."""
    from data.coco import image_transform
    from data.toy_world import pair_scenes
    from models.evcap import memory_key
    transform = image_transform(image_size)
    pairs = list(pair_scenes(per_pair))
    pair_keys = []
    for s in range(0, len(pairs), 256):
        z = encoder(torch.stack([transform(im) for _, im in pairs[s:s + 256]]))
        pair_keys.append(memory_key(sd.condition(z) if space == "cond" else z))
    owners = [{n} for n in names] + [set(n) for n, _ in pairs]
    nearest = (memory_key(x) @ torch.cat([keys] + pair_keys).T).argmax(1).tolist()
    return grouped([owners[j] == t for j, t in zip(nearest, truths)], truths, heldout)


def main(argv=None):
    from data.coco import CocoImageCaptionDataset, image_transform, load_rgb
    from data.toy_world import folder_of, name_of, val_world
    args = parse_args(argv)
    images_dir = os.path.join(args.run, "memory_images")
    if not os.path.isdir(images_dir):
        common.die(f"{images_dir} does not exist; write it with `python -m data.toy_world --memory_dir {images_dir} "
                   f"--memory_per_name 1024` (scripts/captioners.sh does)")
    rows = [("stage 1 (the memory file's keys)", os.path.join(args.run, "stage1"), None)]
    for spec in args.stage2_ckpt:
        name, sep, path = spec.partition("=")
        if not sep:
            common.die(f"--stage2_ckpt {spec}: pass NAME=PATH, e.g. evcap_ft=checkpoints/toy/captioners/evcap_ft")
        rows.append((f"{name} (fine-tuned encoder)", os.path.join(args.run, "stage1"), path))
    data = CocoImageCaptionDataset(val_world(args.run, args.val_world), split="val", image_size=32)
    truths = [{name_of(folder_of(o["colour"], o["shape"])) for o in data.images_info[i]["scene"]["objects"]}
              for i in data.image_ids]
    heldout = [bool(data.images_info[i].get("heldout")) for i in data.image_ids]
    table, header, extra_rows = [], None, []
    for label, stage1, stage2 in rows:
        encoder, sd, _, info = common.load_encoder(stage1, stage2)
        encoder.eval()
        transform = image_transform(info["stage1_image_size"])
        images = torch.stack([transform(load_rgb(data.image_path(i))) for i in data.image_ids])
        keys, names, x = encoded(encoder, sd, images_dir, images, args.space)
        result = scores(keys, names, x, truths, heldout)
        header = header or ["keys and queries by"] + [
            f"{query}: {'1 object' if count == 1 else '2 objects, both'} {'held-out' if held else 'seen'} (n={n})"
            for (query, count, held), (_, n) in result.items()]
        table.append([label] + [f"{acc:.3f}" for acc, _ in result.values()])
        # this encoder's keys and val tokens, already at hand; pooled columns only, the count the rule's
        if args.regions:
            found = region_scores(encoder, sd, keys, names, images, x, args.regions, truths, heldout, args.space)
            extra_rows.append([f"{label.split(' (')[0]}, region views ({args.regions} lines an axis; one name a region)"]
                              + [f"{acc:.3f}" for acc, _ in found.values()] + ["-"] * 4)
        if args.pair_images and stage2 is None:
            pairs = pair_memory_scores(encoder, sd, keys, names, x, args.pair_images, info["stage1_image_size"],
                                       truths, heldout, args.space)
            extra_rows.append([f"stage 1, the memory + {args.pair_images} two-object images a pair (the nearest "
                               f"key's names)"] + [f"{acc:.3f}" for acc, _ in pairs.values()] + ["-"] * 4)
    table += extra_rows
    print(common.machine_description())
    print(f"the memory: {images_dir}; {len(truths)} val images of {os.path.basename(val_world(args.run, args.val_world))}; "
          f"a scene is right when its nearest name (1 object) or two nearest names (2 objects) are its own")
    if args.regions or args.pair_images:
        print("a region or pair row's scene is right when the names it finds are its own, as a set (any number of them)")
    print(common.markdown_table(header, table))
    return table


if __name__ == "__main__":
    errors.run(main)
