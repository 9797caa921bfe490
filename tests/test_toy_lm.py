"""The toy world's tiny "pretrained" causal LM: trained briefly through the shared stage set-up,
resumable, saved as a HF folder that the Auto classes load like distilgpt2."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import reset_accelerator_state
from errors import BadInput
from models.toy_lm import train_tokenizer
from scripts.train_toy_lm import main, token_stream

CAPTIONS = [
    "a large red circle on the left",
    "there is a small blue square above a large green triangle",
    "a single small white triangle at the top",
    "an image of a large yellow square in the middle",
    "a small purple circle to the right of a large red square",
    "a picture showing a small green circle near the bottom",
]
TINY = ["--batch_size", "4", "--n_positions", "32", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
        "--lr", "1e-2", "--lr_warmup_steps", "2", "--mixed_precision", "no", "--log_every", "5"]


def write_captions(data_dir, captions, per_image=2):
    """A COCO captions file: captions grouped per_image to an image."""
    os.makedirs(os.path.join(data_dir, "annotations"), exist_ok=True)
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(-(-len(captions) // per_image))]
    annotations = [{"id": k, "image_id": k // per_image, "caption": c} for k, c in enumerate(captions)]
    with open(os.path.join(data_dir, "annotations", "captions_train2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return str(data_dir)


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
def data_dir(tmp_path_factory):
    return write_captions(tmp_path_factory.mktemp("toy_lm_data"), CAPTIONS * 5)


@pytest.fixture(scope="module")
def toy_lm(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy") / "lm")
    reset_accelerator_state()
    info = main(["--data_dir", data_dir, "--output_dir", out, "--max_steps", "60", "--checkpointing_steps", "30",
                 *TINY])
    return out, info


def test_folder_loads_with_auto_classes_and_learned(toy_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    out_dir, info = toy_lm
    assert os.path.isfile(os.path.join(out_dir, "model.safetensors"))
    assert not [f for f in os.listdir(out_dir) if f.startswith(".")]  # no temporary folder left
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    lm = AutoModelForCausalLM.from_pretrained(out_dir)
    assert isinstance(lm, GPT2LMHeadModel) and info["step"] == 60
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert lm.config.eos_token_id == tokenizer.eos_token_id and lm.config.vocab_size == len(tokenizer)
    for c in CAPTIONS + ["A Red circle, on the LEFT!"]:  # byte-level: even unseen text round-trips
        ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == c
    torch.manual_seed(0)
    init = GPT2LMHeadModel(lm.config).eval()
    assert caption_loss(lm, tokenizer) < caption_loss(init, tokenizer) - 1.0
    assert info["last_loss"] < info["first_loss"]


def test_killed_run_resumes_to_the_same_lm(data_dir, tmp_path):
    argv = ["--data_dir", data_dir, "--max_steps", "6", "--checkpointing_steps", "3", "--checkpoints_total_limit",
            "0", *TINY]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    main(argv + ["--output_dir", straight])
    # a run killed after its step-3 checkpoint: the tokenizer and that checkpoint survive
    os.makedirs(resumed)
    for name in ("toy_lm_3.pt", "tokenizer.json", "tokenizer_config.json"):
        os.link(os.path.join(straight, name), os.path.join(resumed, name))
    assert main(argv + ["--output_dir", resumed, "--resume_from", "latest"])["step"] == 6
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BadInput, match=r"other settings \(--lr 0.01\)"):
        main(argv + ["--output_dir", resumed, "--resume_from", "latest", "--lr", "3e-3"])


def test_paraphrases_of_an_image_stay_together():
    groups = [CAPTIONS[0::3], CAPTIONS[1::3], CAPTIONS[2::3]]
    tokenizer = train_tokenizer(CAPTIONS)
    text = tokenizer.decode(token_stream(groups, tokenizer, seed=1).tolist())
    for g in groups:
        assert "<|endoftext|>".join(g) in text
    assert text.startswith("<|endoftext|>") and text.endswith("<|endoftext|>")


def test_missing_captions_file_is_one_line(tmp_path):
    with pytest.raises(BadInput, match="captions_train2017.json does not exist; generate the toy data first"):
        main(["--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "lm")])


def test_open_world_text_names_every_held_out_pair():
    """--open_world_text: captions of text-only scenes that each hold a held-out (colour, shape),
    grouped by scene, the same for a seed, and every held-out pair among them."""
    from data.toy_world import HELDOUT, parse_caption
    from scripts.train_toy_lm import open_world_groups
    groups = open_world_groups(40, seed=0)
    assert len(groups) == 40 and groups == open_world_groups(40, seed=0) != open_world_groups(40, seed=1)
    said = [{(o["colour"], o["shape"]) for o in parse_caption(c)["objects"]} for g in groups for c in g]
    assert all(s & set(HELDOUT) for s in said)
    assert set().union(*said) >= set(HELDOUT)
