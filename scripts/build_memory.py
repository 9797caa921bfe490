"""Build the EVCap-style visual-name memory: one key per image of DIR/<name>/*, in the frozen
stage-1 space (the L2-normalised token mean of cond(z), or of z), and the names.

    python scripts/build_memory.py --stage1_ckpt checkpoints/toy/stage1 --images_dir checkpoints/toy/memory_images \
        --out checkpoints/toy/memory.safetensors

DIR holds one folder per name (an underscore in a folder's name reads as a space: red_circle ->
"red circle"), e.g. what `python -m data.toy_world --memory_dir DIR` writes for every (colour,
shape) of the toy world, held-out pairs included. Writes OUT (safetensors: keys [M, D]) and OUT
with .json (names, the space, the stage-1 checkpoint and fingerprint it was built from), both
atomically; train_stage2.py --captioner evcap --memory OUT refuses a memory built from another
encoder or space.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # run as `python scripts/build_memory.py`: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402
import errors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage1_ckpt", required=True, help="vision_encoder_{step}.pt, or its run folder (the newest)")
    p.add_argument("--images_dir", required=True, help="one folder of images per name")
    p.add_argument("--out", required=True, help="memory.safetensors (memory.json is written beside it)")
    p.add_argument("--space", default="cond", choices=["cond", "z"],
                   help="the captioner's input: cond(z) (train_stage2's default --prefix_source) or z")
    p.add_argument("--image_size", type=int, default=None, help="default: stage 1's")
    p.add_argument("--batch_size", type=int, default=64)
    return p.parse_args(argv)


def name_folders(images_dir):
    """-> [(name, [image paths])] of images_dir's subfolders, sorted by name."""
    from data.coco import list_images
    if not os.path.isdir(images_dir):
        common.die(f"--images_dir {images_dir} does not exist; pass a folder with one subfolder of images per name "
                   f"(python -m data.toy_world --memory_dir DIR writes the toy world's)")
    folders = sorted(d for d in os.listdir(images_dir) if os.path.isdir(os.path.join(images_dir, d)))
    out = [(d.replace("_", " "), list_images(os.path.join(images_dir, d))) for d in folders]
    out = [(name, files) for name, files in out if files]
    if not out:
        common.die(f"--images_dir {images_dir}: no subfolder holds images; put each name's images in DIR/<name>/")
    return out


@torch.no_grad()
def memory_keys(encoder, sd, images_dir, space, transform, batch_size=64, device="cpu", desc="memory keys"):
    """-> (keys [M,D] float32 on the CPU, names [M], images skipped): one key per readable image of
    images_dir's name folders, by encoder (in eval mode here, put back as it was) in space ("cond" or "z").
    Also what train_stage2.py re-keys an EVCap memory with when it fine-tunes the encoder."""
    from tqdm.auto import tqdm

    from data.coco import read_pixels
    from models.evcap import memory_key
    items = [(name, f) for name, files in name_folders(images_dir) for f in files]
    keys, names, skipped = [], [], 0
    was_training = encoder.training
    encoder.eval()
    try:
        for s in tqdm(range(0, len(items), batch_size), desc=desc):
            batch = [(name, read_pixels(f, transform)) for name, f in items[s:s + batch_size]]
            skipped += sum(x is None for _, x in batch)
            batch = [(name, x) for name, x in batch if x is not None]
            if not batch:
                continue
            z = encoder(torch.stack([x for _, x in batch]).to(device))
            keys.append(memory_key(sd.condition(z) if space == "cond" else z).cpu())
            names += [name for name, _ in batch]
    finally:
        encoder.train(was_training)
    if not names:
        common.die(f"--images_dir {images_dir}: none of its {len(items)} images could be read")
    return torch.cat(keys).contiguous(), names, skipped


@torch.no_grad()
def main(argv=None):
    from safetensors.torch import save_file

    from data.coco import image_transform
    from models.evcap import memory_paths
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = common.resolve_checkpoint(args.stage1_ckpt, "vision_encoder")
    encoder, sd, config, stage1_fingerprint = common.load_stage1(path, device)
    encoder.eval()
    transform = image_transform(args.image_size or config["image_size"])
    keys, names, skipped = memory_keys(encoder, sd, args.images_dir, args.space, transform, args.batch_size, device)
    keys_path, names_path = memory_paths(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(keys_path)), exist_ok=True)
    info = dict(names=names, space=args.space, stage1_ckpt=os.path.abspath(path), stage1_fingerprint=stage1_fingerprint,
                images_dir=os.path.abspath(args.images_dir), skipped_images=skipped,
                # what a captioner trained on this memory checks it still reads: keys and names
                fingerprint=common.fingerprint({"keys": keys, "names": torch.tensor(list(" ".join(names).encode()))}))
    with common.atomic_path(keys_path, ".tmp.safetensors") as tmp:
        save_file({"keys": keys}, tmp)
    common.save_json(names_path, info)
    print(f"{len(names)} keys of {len(set(names))} names ({skipped} unreadable images skipped) -> {keys_path}, "
          f"{names_path}")
    return keys_path


if __name__ == "__main__":
    errors.run(main)
