"""Pre-train the toy world's tiny causal LM and save it as a Hugging Face folder, like distilgpt2.

A byte-level BPE tokenizer is trained on the toy captions, and a small GPT-2 (models/toy_lm.py) on
them the way GPT-2 was: captions joined by <|endoftext|> into one stream, cut into blocks of
n_positions tokens, so every position of the LM is trained, whatever prefix length the captioner
later puts in front of a caption. The paraphrases of one image sit next to each other in the
stream: then, as in real text, what comes before an <|endoftext|> is informative about what
follows, so the LM learns to read its context, the context the captioner's prefix later takes the
place of (an LM trained on unrelated captions learns to ignore everything before <|endoftext|>,
and a frozen one then hardly listens to the prefix).

A training stage like the others (common.setup_run, common.Trainer): checkpoints toy_lm_{step}.pt
in OUTPUT_DIR, --resume_from latest. At the end the LM and its tokenizer are saved in OUTPUT_DIR
(config.json last, so a folder with config.json is complete); it loads with
AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUTPUT_DIR).

    python -m scripts.train_toy_lm --data_dir checkpoints/toy/data --output_dir checkpoints/toy/lm

--open_world_text N adds text naming the held-out pairs (an LM that knows names the captions lack,
as a pretrained LM does), for the open-world captioners (scripts/captioners.sh's open rows).
"""
import argparse
import os
import random
import shutil

import torch

import common
import errors
from data.coco import read_captions
from models.checkpointing import enable_library_checkpointing
from models.toy_lm import build_toy_lm, train_tokenizer

CKPT_PREFIX = "toy_lm"
CKPT_KIND = "toy_lm"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", required=True, help="toy data root (annotations/captions_train2017.json)")
    p.add_argument("--open_world_text", type=int, default=0,
                   help="also read the captions of N text-only scenes that hold a held-out (colour, shape) pair: "
                        "the text a web-trained LM has read, naming what no training caption does (EVCap's "
                        "Vicuna knows LVIS names COCO lacks); 0: the train captions alone, the pipeline's LM")
    g = p.add_argument_group("model")
    g.add_argument("--n_positions", type=int, default=128,
                   help="context length: must exceed the captioner's prefix length + caption length")
    g.add_argument("--n_layer", type=int, default=3)
    g.add_argument("--n_embd", type=int, default=128)
    g.add_argument("--n_head", type=int, default=4)
    g.add_argument("--vocab_size", type=int, default=1024)
    common.add_training_args(p)
    p.set_defaults(max_steps=250, batch_size=8, lr=3e-3, lr_warmup_steps=25, lr_scheduler="linear",
                   weight_decay=0.01, checkpointing_steps=100, checkpoints_total_limit=1, num_workers=0,
                   validation_steps=0)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def token_stream(captions, tokenizer, seed):
    """<eot> cap <eot> cap <eot> ... as one LongTensor. captions: strings, or groups of strings (the
    paraphrases of one image), which stay together; groups are shuffled with the seed."""
    groups = [[c] if isinstance(c, str) else list(c) for c in captions]
    random.Random(seed).shuffle(groups)
    flat = [c for g in groups for c in g]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    eot = tokenizer.eos_token_id
    stream = [eot]
    for x in ids:
        stream += x + [eot]
    return torch.tensor(stream, dtype=torch.long)


def blocks(stream, n_positions):
    """The stream cut into [N, n_positions] training blocks (repeated when shorter than two)."""
    if len(stream) < 2 * n_positions:
        stream = stream.repeat(2 * n_positions // len(stream) + 1)
    n = len(stream) // n_positions
    return stream[:n * n_positions].view(n, n_positions)


def caption_groups(data_dir):
    """The train captions grouped by image, in file order: [[caption, ...], ...]."""
    ann = os.path.join(data_dir, "annotations", "captions_train2017.json")
    _, captions = read_captions(ann, "generate the toy data first (python -m data.toy_world --output_dir DIR)")
    groups = [c for c in captions.values() if c]
    if not groups:
        common.die(f"{ann}: no captions in 'annotations'")
    return groups


def open_world_groups(n, seed):
    """The captions of n scenes, each with a held-out pair, grouped by scene (no image is drawn)."""
    import numpy as np

    from data.toy_world import make_captions, sample_scene
    rng = np.random.default_rng([seed, 2])  # a stream of its own: the train and val splits use 0 and 1
    return [make_captions(sample_scene(rng, heldout=True), rng) for _ in range(n)]


def save_folder(lm, output_dir):
    """The LM's files into output_dir (its tokenizer is there already), config.json last: a folder
    holding config.json is whole."""
    tmp = os.path.join(output_dir, f".save-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    for name in names:
        common.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)


def main(argv=None):
    args = parse_args(argv)
    groups = caption_groups(args.data_dir) + open_world_groups(args.open_world_text, args.seed)
    accelerator, _ = common.setup_run(args, "vlv_toy_lm")
    from transformers import AutoTokenizer
    if args.resume_from and os.path.isfile(os.path.join(args.output_dir, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(args.output_dir)  # the one the checkpoints' LM reads
    else:
        tokenizer = train_tokenizer([c for g in groups for c in g], args.vocab_size)
        tokenizer.model_max_length = args.n_positions
        if accelerator.is_main_process:
            tokenizer.save_pretrained(args.output_dir)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    lm = build_toy_lm(tokenizer, n_positions=args.n_positions, n_layer=args.n_layer, n_embd=args.n_embd,
                      n_head=args.n_head)
    if args.gradient_checkpointing:
        enable_library_checkpointing(lm)
    dataset = blocks(token_stream(groups, tokenizer, args.seed), args.n_positions)   # [N, n_positions]
    loader = common.train_loader(dataset, args, accelerator, collate_fn=torch.stack)
    optimizer, lr_scheduler, steps_per_epoch, max_steps = common.build_optimization(
        accelerator, args, lm.parameters(), loader)
    model, optimizer, lr_scheduler = accelerator.prepare(lm, optimizer, lr_scheduler)
    trainer = common.Trainer(
        accelerator=accelerator, args=args, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
        loader=loader, steps_per_epoch=steps_per_epoch, max_steps=max_steps, kind=CKPT_KIND,
        prefix=CKPT_PREFIX, config=dict(lm.config.to_dict()), model_state=lm.state_dict,
        load_model_state=lm.load_state_dict)
    common.resume(trainer, args)
    losses = []

    def compute_loss(batch):                                            # [B, n_positions]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        losses.append(loss.item())
        return loss

    trainer.train(compute_loss, desc="toy lm")
    common.finish_run(trainer)
    if accelerator.is_main_process:
        save_folder(accelerator.unwrap_model(model).eval(), args.output_dir)
    k = min(10, len(losses))
    info = {"output_dir": args.output_dir, "step": trainer.step, "vocab_size": len(tokenizer),
            "num_captions": sum(len(g) for g in groups),
            "first_loss": sum(losses[:k]) / k if k else None, "last_loss": sum(losses[-k:]) / k if k else None}
    print(f"toy LM ({info['vocab_size']} tokens, {info['num_captions']} captions, {trainer.step} steps) "
          f"saved to {args.output_dir}")
    return info


if __name__ == "__main__":
    errors.run(main)
