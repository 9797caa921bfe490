"""A tiny "pretrained" causal LM for the toy world, saved as a Hugging Face folder like distilgpt2.

A byte-level BPE tokenizer (the `tokenizers` library, GPT-2's scheme: exact round trip of any text)
is trained on the toy captions, and a small GPT2LMHeadModel is pre-trained on them the way GPT-2
was: captions joined by <|endoftext|> into one stream, cut into blocks of n_positions tokens. So
<|endoftext|> is BOS, EOS and document separator (as in GPT-2), and every position of the LM is
trained, whatever prefix length the captioner later puts in front of a caption. The paraphrases of
one image sit next to each other in the stream, so the LM learns to use its context (see
build_toy_lm).

    python -m models.toy_lm --data_dir checkpoints/toy/data --out_dir checkpoints/toy/lm

The folder loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(out_dir).
"""
import argparse
import json
import os
import random
import shutil
import time

import torch

EOT = "<|endoftext|>"


def die(message):
    raise SystemExit(f"error: {message}")


def read_coco_captions(json_path):
    """The captions of a COCO captions json, grouped by image: [[caption, ...], ...]."""
    if not os.path.isfile(json_path):
        die(f"{json_path}: not found; generate the toy data first (python -m data.toy_world --out_dir DIR ...)")
    try:
        with open(json_path) as f:
            groups = {}
            for a in json.load(f)["annotations"]:
                groups.setdefault(a["image_id"], []).append(a["caption"].strip())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        die(f"{json_path}: not a COCO captions json ({type(e).__name__}: {e}); expected "
            f"{{'annotations': [{{'caption': ...}}, ...]}}")
    if not groups:
        die(f"{json_path}: no captions in 'annotations'")
    return list(groups.values())


def train_tokenizer(captions, vocab_size=1024):
    """Byte-level BPE trained on captions -> a transformers fast tokenizer (pad token unset, as GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(captions, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def token_stream(captions, tokenizer, seed):
    """<eot> cap <eot> cap <eot> ... as one LongTensor. captions: strings, or groups of strings (the
    paraphrases of one image), which stay together so that the text before an <eot> tells about
    the caption after it; groups are shuffled with the seed."""
    groups = [[c] if isinstance(c, str) else list(c) for c in captions]
    random.Random(seed).shuffle(groups)
    flat = [c for g in groups for c in g]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    eot = tokenizer.eos_token_id
    stream = [eot]
    for x in ids:
        stream += x + [eot]
    return torch.tensor(stream, dtype=torch.long)


def build_toy_lm(captions, out_dir, seed=0, steps=250, batch_size=8, n_positions=128, n_layer=3,
                 n_embd=128, n_head=4, lr=3e-3, vocab_size=1024, log_every=100):
    """Train the tokenizer and a small GPT-2 on captions; save both (safetensors) to out_dir,
    atomically. captions: strings, or groups of strings (one group per image; read_coco_captions
    gives them), which are kept next to each other in the pre-training stream: then, as in real
    text, what comes before an <|endoftext|> is informative about what follows, so the LM learns to
    read its context, the context the captioner's prefix later takes the place of (an LM trained on
    unrelated captions learns to ignore everything before <|endoftext|>, and a frozen one then
    hardly listens to the prefix). Returns a dict with the mean LM loss of the first and the last
    10 steps."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    flat = [c for g in captions for c in ([g] if isinstance(g, str) else g)]
    tokenizer = train_tokenizer(flat, vocab_size)
    tokenizer.model_max_length = n_positions
    eot = tokenizer.eos_token_id
    # GPT-2's tanh GELU as PyTorch's one fused kernel, not transformers' "gelu_new" written out in
    # five elementwise ops: the same function, and toy stage 2 steps 1.2x faster on 2 CPU cores.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eot, eos_token_id=eot, activation_function="gelu_pytorch_tanh")
    model = GPT2LMHeadModel(config)
    stream = token_stream(captions, tokenizer, seed)
    if len(stream) <= n_positions:  # too few captions for one block: repeat them
        stream = stream.repeat(n_positions // len(stream) + 2)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / max(1, steps - warmup)))
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - n_positions, (batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + n_positions] for s in starts])   # [B,n_positions]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"toy lm step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()

    # Written next to out_dir and swapped in, so a crash never leaves a half-written folder.
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = None
    if os.path.exists(out_dir):
        old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    k = min(10, len(losses))
    return {"out_dir": out_dir, "first_loss": sum(losses[:k]) / k, "last_loss": sum(losses[-k:]) / k,
            "vocab_size": len(tokenizer), "num_captions": len(flat)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the toy world's tiny causal LM and save it as a HF folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", required=True, help="toy data root (annotations/captions_train2017.json)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--n_positions", type=int, default=128,
                   help="context length: must exceed the captioner's prefix length + caption length")
    p.add_argument("--n_layer", type=int, default=3)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--num_threads", type=int, default=0,
                   help="torch threads; 0 keeps torch's default (on a CPU shared with other jobs, 1 "
                        "can be much faster than 2)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    captions = read_coco_captions(os.path.join(args.data_dir, "annotations", "captions_train2017.json"))
    info = build_toy_lm(captions, args.out_dir, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                        n_positions=args.n_positions, n_layer=args.n_layer, n_embd=args.n_embd)
    print(f"toy LM ({info['vocab_size']} tokens, {info['num_captions']} captions): loss "
          f"{info['first_loss']:.3f} -> {info['last_loss']:.3f}; saved to {info['out_dir']}")
    return info


if __name__ == "__main__":
    main()
