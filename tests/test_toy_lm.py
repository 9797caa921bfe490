"""The toy world's tiny "pretrained" causal LM: trained briefly, saved as a HF folder, loaded by
the Auto classes like distilgpt2."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from models.toy_lm import build_toy_lm, main, read_coco_captions, token_stream, train_tokenizer

CAPTIONS = [
    "a large red circle on the left",
    "there is a small blue square above a large green triangle",
    "a single small white triangle at the top",
    "an image of a large yellow square in the middle",
    "a small purple circle to the right of a large red square",
    "a picture showing a small green circle near the bottom",
]
TINY = dict(steps=60, batch_size=4, n_positions=32, n_layer=1, n_embd=32, n_head=2, lr=1e-2, log_every=0)


def caption_loss(lm, tokenizer):
    """Mean LM loss of "<eot> caption <eot>", the way the captioner and pre-training see text."""
    eot = tokenizer.eos_token_id
    losses = []
    with torch.no_grad():
        for c in CAPTIONS:
            ids = torch.tensor([[eot] + tokenizer(c, add_special_tokens=False)["input_ids"] + [eot]])
            losses.append(lm(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def toy_lm(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("toy") / "lm"
    info = build_toy_lm(CAPTIONS * 5, out_dir, seed=0, **TINY)
    return str(out_dir), info


def test_folder_loads_with_auto_classes_and_learned(toy_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    out_dir, info = toy_lm
    assert os.path.isfile(os.path.join(out_dir, "model.safetensors"))
    assert [f for f in os.listdir(os.path.dirname(out_dir)) if f.startswith(".")] == []  # no temp folders left
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    lm = AutoModelForCausalLM.from_pretrained(out_dir)
    assert isinstance(lm, GPT2LMHeadModel)
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert lm.config.eos_token_id == tokenizer.eos_token_id and lm.config.vocab_size == len(tokenizer)
    for c in CAPTIONS + ["A Red circle, on the LEFT!"]:  # byte-level: even unseen text round-trips
        ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == c
    torch.manual_seed(0)
    init = GPT2LMHeadModel(lm.config).eval()
    assert caption_loss(lm, tokenizer) < caption_loss(init, tokenizer) - 1.0
    assert info["last_loss"] < info["first_loss"]


def test_deterministic_by_seed_and_overwrites_atomically(toy_lm, tmp_path):
    out_dir, _ = toy_lm
    again = tmp_path / "lm"
    os.makedirs(again)
    (again / "stale.txt").write_text("from an older run")
    build_toy_lm(CAPTIONS * 5, again, seed=0, **TINY)
    assert not (again / "stale.txt").exists()
    a, b = load_file(os.path.join(out_dir, "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path)) == ["lm"]


def test_paraphrases_of_an_image_stay_together(tmp_path):
    path = tmp_path / "captions.json"
    annotations = [{"id": i, "image_id": i % 3, "caption": c + " "} for i, c in enumerate(CAPTIONS)]
    path.write_text(json.dumps({"annotations": annotations}))
    groups = read_coco_captions(str(path))
    assert groups == [CAPTIONS[0::3], CAPTIONS[1::3], CAPTIONS[2::3]]
    tokenizer = train_tokenizer(CAPTIONS)
    text = tokenizer.decode(token_stream(groups, tokenizer, seed=1).tolist())
    for g in groups:
        assert "<|endoftext|>".join(g) in text
    assert text.startswith("<|endoftext|>") and text.endswith("<|endoftext|>")


def test_cli_reads_coco_captions(tmp_path):
    data_dir = tmp_path / "data"
    os.makedirs(data_dir / "annotations")
    annotations = [{"id": i, "image_id": i // 2, "caption": c} for i, c in enumerate(CAPTIONS)]
    (data_dir / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": [{"id": i} for i in range(len(CAPTIONS))], "annotations": annotations}))
    info = main(["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "lm"), "--steps", "3",
                 "--n_layer", "1", "--n_embd", "32", "--n_positions", "32"])
    assert info["num_captions"] == len(CAPTIONS)
    assert os.path.isfile(tmp_path / "lm" / "tokenizer.json")
    with pytest.raises(SystemExit, match="captions_train2017.json: not found"):
        main(["--data_dir", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "lm2")])
