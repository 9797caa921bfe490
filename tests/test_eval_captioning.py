"""eval_captioning: pycocoevalcap parity, resumable predictions, CLIPScore formula, bad input, toy attributes.

The PTB tokenizer and METEOR start a JVM (METEOR about 10 s), so only the last test runs METEOR, and
it shares one METEOR process between our scorer and COCOEvalCap (the jar is stateless per call).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import eval_captioning
from data import toy_world
from conftest import needs_java
from data.predictions import read_predictions, run_predictions
from errors import BadInput

REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave!",
        "Man on a surf board, in the ocean.", "a person surfing a big wave"],
    2: ["Two dogs playing with a frisbee in the park.", "Dogs run on the grass chasing a frisbee",
        "two brown dogs play in a field"],
    3: ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate.",
        "a dinner plate holding vegetables and meat", "Food on a plate - broccoli & rice.",
        "A healthy meal of rice and broccoli"],
    4: ["A red bus driving down a city street.", "The double decker bus is red.",
        "a bus on the road in a town"],
    5: ["A cat sleeping on a laptop keyboard.", "A cat lies on a computer.",
        "kitten asleep on the keys of a laptop"],
    6: ["An unscored image: no prediction is made for it.", "It still has references."],
}
PREDS = {1: "a man riding a wave on a surfboard", 2: "two dogs playing with a frisbee",
         3: "a plate of rice and broccoli", 4: "a red bus on a street", 5: "a dog on a bed"}


def make_coco(root, refs=REFS, infos=None, size=16):
    """A COCO-layout folder: root/annotations/captions_val2017.json and root/val2017/*.png."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "val2017"), exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for image_id, captions in refs.items():
        name = f"{image_id:012d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(
            os.path.join(root, "val2017", name))
        images.append({"id": image_id, "file_name": name, "height": size, "width": size + 4,
                       **((infos or {}).get(image_id, {}))})
        anns += [{"id": len(anns) + 1, "image_id": image_id, "caption": c} for c in captions]
    path = os.path.join(root, "annotations", "captions_val2017.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return path


def write_preds(path, preds, jsonl=False):
    records = [{"image_id": i, "caption": c} for i, c in preds.items()]
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return path


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    make_coco(root)
    return root


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIPModel + processor saved like a hub folder (byte-level vocab, no merges)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in ByteLevel.alphabet():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)
    out = str(tmp_path_factory.mktemp("clip"))
    CLIPModel(config).save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def shared_meteor():
    """One METEOR JVM for the module, started first so its ~10 s of loading overlaps other tests."""
    if shutil.which("java") is None:
        yield None
        return
    from pycocoevalcap.meteor.meteor import Meteor
    meteor = Meteor()
    yield meteor
    del meteor


# ---------------------------------------------------------------------------------------------

@needs_java
def test_jsonl_and_json_give_the_same_scores_clip_and_sheet(coco_dir, tmp_path, tiny_clip_dir, capsys):
    ann = os.path.join(coco_dir, "annotations", "captions_val2017.json")
    scores = {}
    for kind in ("json", "jsonl"):
        path = write_preds(str(tmp_path / f"preds.{kind}"), PREDS, jsonl=kind == "jsonl")
        scores[kind] = eval_captioning.main(["--preds_json", path, "--ann_json", ann,
                                             "--metrics", "bleu,rouge,cider,clip", "--clip_model", tiny_clip_dir])
    assert scores["json"] == scores["jsonl"]
    assert set(scores["json"]) >= {"BLEU-4", "ROUGE-L", "CIDEr-D", "CLIPScore", "RefCLIPScore"}
    assert "METEOR" not in scores["json"]
    printed = capsys.readouterr().out
    assert "Hessel" in printed and "100*cos" in printed  # the CLIP table says which scale it shows
    # default outputs next to the predictions; the sheet is a real PNG of the 5 scored images
    assert os.path.isfile(tmp_path / "preds.scores.json")
    with Image.open(tmp_path / "preds.sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.size[0] > 100
    # CLIPScore through main equals the function on the same images (loaded from the folder)
    ids = list(PREDS)
    images = [Image.open(os.path.join(coco_dir, "val2017", f"{i:012d}.png")).convert("RGB") for i in ids]
    direct = eval_captioning.clip_scores(images, [PREDS[i] for i in ids], [REFS[i] for i in ids], tiny_clip_dir)
    assert direct["CLIPScore"] == pytest.approx(scores["json"]["CLIPScore"], abs=1e-6)
    assert direct["RefCLIPScore"] == pytest.approx(scores["json"]["RefCLIPScore"], abs=1e-6)


def test_clip_score_formula_by_hand(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor
    rng = np.random.default_rng(1)
    images = [torch.from_numpy(rng.random((3, 20, 28), dtype=np.float32)) for _ in range(4)]
    captions = ["a red circle", "two blue squares on the left", "", "a cat on a mat"]
    refs = [["a red ball", "a circle"], ["blue squares"], ["nothing at all", "an empty picture", "x"],
            ["a cat"]]
    got = eval_captioning.clip_scores(images, captions, refs, tiny_clip_dir, batch_size=3)

    # By hand, through CLIPModel.forward's own normalised embeddings.
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    with torch.no_grad():
        out = model(**processor(text=["A photo depicts " + c for c in captions], images=pils,
                                return_tensors="pt", padding=True))
        cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
        cand = out.text_embeds.numpy()
        ref_cos = []
        for k, rs in enumerate(refs):
            r = model(**processor(text=["A photo depicts " + t for t in rs], images=pils[:1],
                                  return_tensors="pt", padding=True)).text_embeds.numpy()
            ref_cos.append((r @ cand[k]).max())
    clip_s = 2.5 * np.maximum(cos, 0)
    best = np.maximum(np.array(ref_cos), 0)
    ref_s = np.where(clip_s + best > 0, 2 * clip_s * best / np.maximum(clip_s + best, 1e-12), 0)
    assert got["CLIPScore"] == pytest.approx(clip_s.mean(), abs=1e-5)
    assert got["RefCLIPScore"] == pytest.approx(ref_s.mean(), abs=1e-5)
    assert got["num_images"] == 4
    no_refs = eval_captioning.clip_scores(images, captions, None, tiny_clip_dir)
    assert "RefCLIPScore" not in no_refs and no_refs["CLIPScore"] == pytest.approx(got["CLIPScore"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Resumable predictions

class Captioner:
    """caption_fn that counts how often each image is captioned and can die after k batches."""

    def __init__(self, fail_after=None):
        self.calls, self.batches, self.fail_after = {}, 0, fail_after

    def __call__(self, images):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        captions = []
        for im in images:
            image_id = int(im[0, 0, 0].item())
            self.calls[image_id] = self.calls.get(image_id, 0) + 1
            captions.append(f"caption of {image_id}")
        return captions


def make_items(ids, loads):
    def loader(i):
        def load():
            loads[i] = loads.get(i, 0) + 1
            return None if i == 13 else torch.full((3, 4, 4), float(i))  # 13 is unreadable
        return load
    return [{"image_id": i, "pixel_values": loader(i)} for i in ids]


def test_killed_run_resumes_without_captioning_twice(tmp_path):
    out = str(tmp_path / "preds.jsonl")
    ids = list(range(10, 21))
    loads = {}
    first = Captioner(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_predictions(first, make_items(ids, loads), out, batch_size=3)
    assert sorted(first.calls) == [10, 11, 12, 14, 15]  # 13 is unreadable: skipped
    with open(out, "a") as f:  # the kill also tore a line in half
        f.write('{"image_id": 16, "capt')

    loads.clear()
    second = Captioner()
    preds = run_predictions(second, make_items(ids, loads), out, batch_size=3)
    assert set(first.calls).isdisjoint(second.calls)
    assert sorted(second.calls) == [16, 17, 18, 19, 20] and set(second.calls.values()) == {1}
    assert set(loads) == {13, 16, 17, 18, 19, 20}  # images already captioned are not even loaded
    assert list(preds) == [i for i in ids if i != 13]
    assert preds[16] == "caption of 16"
    with open(out) as f:
        lines = f.read().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: the torn one is gone
    assert [r["image_id"] for r in records] == [10, 11, 12, 14, 15, 16, 17, 18, 19, 20]

    third = Captioner()
    assert run_predictions(third, make_items(ids, {}), out, batch_size=3) == preds
    assert third.calls == {}


def test_unterminated_but_whole_last_line_is_kept(tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text('{"image_id": 10, "caption": "a"}\n{"image_id": 11, "caption": "b"}')
    cap = Captioner()
    preds = run_predictions(cap, make_items([10, 11, 12], {}), str(out), batch_size=2)
    assert preds == {10: "a", 11: "b", 12: "caption of 12"} and list(cap.calls) == [12]
    assert [json.loads(line)["image_id"] for line in out.read_text().splitlines()] == [10, 11, 12]


# ---------------------------------------------------------------------------------------------
# Bad input: one line each

def bad_input_cases(tmp, ann):
    good = write_preds(os.path.join(tmp, "good.json"), PREDS)
    unknown = write_preds(os.path.join(tmp, "unknown.json"), {**PREDS, 999: "an image not annotated"})
    twice = os.path.join(tmp, "twice.jsonl")
    with open(twice, "w") as f:
        f.write('{"image_id": 1, "caption": "a"}\n{"image_id": 1, "caption": "b"}\n')
    broken = os.path.join(tmp, "broken.jsonl")
    with open(broken, "w") as f:
        f.write('{"image_id": 1, "caption": "a"}\nnot json\n{"image_id": 2, "caption": "b"}\n')
    no_caption = os.path.join(tmp, "no_caption.json")
    with open(no_caption, "w") as f:
        json.dump([{"image_id": 1, "text": "a"}], f)
    bad_ann = os.path.join(tmp, "bad_ann.json")
    with open(bad_ann, "w") as f:
        f.write("{not json")
    return {
        "unknown metric": (["--preds_json", good, "--ann_json", ann, "--metrics", "bleu,cidr"], "cidr"),
        "spice as metric": (["--preds_json", good, "--ann_json", ann, "--metrics", "spice"], "--spice"),
        "missing preds": (["--preds_json", os.path.join(tmp, "nope.json"), "--ann_json", ann], "nope.json"),
        "missing ann": (["--preds_json", good, "--ann_json", os.path.join(tmp, "nope_ann.json")], "nope_ann"),
        "ids not annotated": (["--preds_json", unknown, "--ann_json", ann], "999"),
        "duplicate id": (["--preds_json", twice, "--ann_json", ann], "second prediction"),
        "torn middle line": (["--preds_json", broken, "--ann_json", ann], "line 2"),
        "record without caption": (["--preds_json", no_caption, "--ann_json", ann], "caption"),
        "ann not json": (["--preds_json", good, "--ann_json", bad_ann], "bad_ann.json"),
        "clip dir missing": (["--preds_json", good, "--ann_json", ann, "--clip_model",
                              os.path.join(tmp, "noclip")], "noclip"),
        "no mode": (["--metrics", "bleu"], "--preds_json"),
        "both modes": (["--preds_json", good, "--ann_json", ann, "--stage1_ckpt", "a.pt",
                        "--stage2_ckpt", "b.pt"], "not both"),
        "regen without model": (["--preds_json", good, "--ann_json", ann, "--regen"], "--regen"),
    }


def test_bad_inputs_give_one_line(coco_dir, tmp_path):
    ann = os.path.join(coco_dir, "annotations", "captions_val2017.json")
    for name, (argv, needle) in bad_input_cases(str(tmp_path), ann).items():
        with pytest.raises(BadInput) as e:
            eval_captioning.main(argv + ["--num_sheet_images", "0"])
        message = str(e.value)
        assert message and "\n" not in message and needle in message, (name, message)


# ---------------------------------------------------------------------------------------------
# Toy world attributes

def scene(objects, position=None, relation=None):
    return {"objects": [dict(zip(("colour", "shape", "size"), o)) for o in objects],
            "position": position, "relation": relation}


TOY = {  # image_id: (scene, heldout, predicted caption, colour right?, everything right?)
    1: (scene([("red", "circle", "small")], position="left"), False, "a small red circle on the left", True, True),
    2: (scene([("blue", "square", "large")], position="top"), False, "a large green square at the top", False, False),
    3: (scene([("yellow", "triangle", "small")], position="center"), False, "a small yellow triangle in the center",
        True, True),
    4: (scene([("purple", "circle", "large")], position="right"), True, "a large purple circle on the right",
        True, True),
    5: (scene([("white", "square", "small")], position="bottom"), True, "a small red square at the bottom",
        False, False),
    # the right objects, the wrong order: attributes right, relation (and so "all") wrong
    7: (scene([("red", "circle", "small"), ("blue", "square", "large")], relation="left of"), False,
        "a small red circle to the right of a large blue square", True, False),
}


def test_attribute_accuracy_counts_seen_and_heldout_apart():
    infos = {i: {"scene": s, "heldout": h} for i, (s, h, *_) in TOY.items()}
    infos[6] = {"file_name": "no scene: not counted"}
    preds = {i: t[2] for i, t in TOY.items()}
    preds[6] = "a red circle"
    acc = eval_captioning.attribute_accuracy(preds, infos)
    seen, held, overall = acc["seen"], acc["heldout"], acc["overall"]
    one, two = acc["seen, 1 object"], acc["seen, 2 objects"]
    assert (seen["num_images"], held["num_images"], overall["num_images"]) == (4, 2, 6)
    assert (one["num_images"], two["num_images"]) == (3, 1)
    assert seen["colour"]["total"] == 4 and seen["colour"]["correct"] == 3
    assert held["colour"]["total"] == 2 and held["colour"]["correct"] == 1
    assert seen["all"]["correct"] == 2 and held["all"]["correct"] == 1
    assert held["all"]["accuracy"] == 0.5 and overall["all"]["correct"] == 3
    assert seen["shape"]["correct"] == 4 and held["shape"]["correct"] == 2
    assert two["relation"]["correct"] == 0 and two["colour"]["correct"] == 1 and "relation" not in one
    table = eval_captioning.markdown_tables({"num_images": 6, "attribute_accuracy": acc})
    assert "| all | 0.500 (2/4) | 0.667 (2/3) | 0.000 (0/1) | 0.500 (1/2) |" in table
    assert "| relation | 0.000 (0/1) | - | 0.000 (0/1) | - |" in table
    assert "seen (n=4)" in table and "seen, 2 objects (n=1)" in table and "held-out (n=2)" in table


def toy_world_refs(data_dir):
    from data.coco import read_captions
    return read_captions(os.path.join(data_dir, "annotations", "captions_val2017.json"))


@needs_java
def test_scores_of_known_captions():
    """A caption equal to its only reference scores 1 on BLEU-1..4 and ROUGE-L; one sharing no
    word with it, 0 on BLEU-1 and CIDEr-D."""
    refs = {1: ["a large red circle on the left of the picture"], 2: ["two small blue squares at the top"]}
    same = eval_captioning.score_captions({i: r[0] for i, r in refs.items()}, refs, ["bleu", "rouge"])
    assert all(same[k] == pytest.approx(1.0) for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L")), same
    other = eval_captioning.score_captions({1: "dogs run", 2: "cats sleep"}, refs, ["bleu", "cider"])
    assert other["BLEU-1"] == pytest.approx(0.0, abs=1e-6) and other["CIDEr-D"] == 0.0


class FakeVLV:
    """Stands in for load_vlv's model: names every image a small red circle on the left."""
    image_size = 32
    info = dict(encoder_fingerprint="fake", stage2_ckpt="s2.pt")
    text_space = None  # trained on images

    def __init__(self):
        self.captioned, self.regenerated = [], 0

    def caption(self, images, **kwargs):
        assert images.shape[1:] == (3, 32, 32) and kwargs["num_beams"] == 2
        self.captioned.append(images.shape[0])
        return ["a small red circle on the left"] * images.shape[0]

    def regenerate(self, images, captions, num_inference_steps, guidance_scale, seed):
        self.regenerated += len(captions)
        return torch.rand(len(captions), 3, 48, 48)


@needs_java
def test_model_mode_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    data_dir = str(tmp_path / "toy")
    toy_world.generate(data_dir, num_train=2, num_val=10, seed=0)
    vlv = FakeVLV()
    monkeypatch.setattr(common, "load_vlv", lambda stage1, stage2, device: vlv)
    out_jsonl = str(tmp_path / "new_dir" / "preds.jsonl")  # its folder is made
    argv = ["--stage1_ckpt", "s1.pt", "--stage2_ckpt", "s2.pt", "--data_dir", data_dir, "--split", "val",
            "--num_samples", "7", "--batch_size", "3", "--num_beams", "2", "--out_jsonl", out_jsonl,
            "--metrics", "bleu,cider,clip", "--regen", "--num_sheet_images", "4", "--device", "cpu"]
    scores = eval_captioning.main(argv)
    assert vlv.captioned == [3, 3, 1] and vlv.regenerated == 4
    with open(out_jsonl) as f:
        assert len(f.read().splitlines()) == 7
    assert scores["num_images"] == 7
    # the scores are those of the predictions file against the split's references
    images, refs = toy_world_refs(data_dir)
    preds = read_predictions(out_jsonl)
    assert list(preds) == list(images)[:7] and set(preds.values()) == {"a small red circle on the left"}
    direct = eval_captioning.score_captions(preds, refs, ["bleu", "cider"])
    assert scores["BLEU-1"] == direct["BLEU-1"] and scores["CIDEr-D"] == direct["CIDEr-D"]
    acc = scores["attribute_accuracy"]
    assert acc["seen"]["num_images"] + acc["heldout"]["num_images"] == 7
    printed = capsys.readouterr().out
    assert "CLIPScore skipped" in printed and "held-out (n=" in printed
    with Image.open(tmp_path / "new_dir" / "preds.sheet.png") as sheet:
        assert sheet.format == "PNG"
    with open(tmp_path / "new_dir" / "preds.scores.json") as f:
        assert json.load(f) == scores

    vlv.captioned.clear()
    assert eval_captioning.main(argv) == scores  # a re-run finds every caption on disk
    assert vlv.captioned == []


# ---------------------------------------------------------------------------------------------
# Last: by now METEOR's JVM (started by the module fixture) has loaded its tables.

@needs_java
def test_preds_json_equals_cocoevalcap(coco_dir, tmp_path, monkeypatch, capsys, shared_meteor):
    import pycocoevalcap.eval
    import pycocoevalcap.meteor.meteor
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    class NoSpice:  # COCOEvalCap always runs SPICE, which downloads CoreNLP: not here
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    monkeypatch.setattr(pycocoevalcap.eval, "Meteor", lambda: shared_meteor)
    monkeypatch.setattr(pycocoevalcap.meteor.meteor, "Meteor", lambda: shared_meteor)

    ann = os.path.join(coco_dir, "annotations", "captions_val2017.json")
    preds_path = write_preds(str(tmp_path / "preds.json"), dict(reversed(list(PREDS.items()))))
    out_json = str(tmp_path / "scores.json")
    ours = eval_captioning.main(["--preds_json", preds_path, "--ann_json", ann, "--out_json", out_json,
                                 "--metrics", "bleu,meteor,rouge,cider,clip", "--num_sheet_images", "0"])
    printed = capsys.readouterr().out

    coco = COCO(ann)
    res = coco.loadRes(preds_path)
    theirs = COCOEvalCap(coco, res)
    theirs.params["image_id"] = res.getImgIds()
    theirs.evaluate()

    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
             "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr-D"}
    for theirs_name, our_name in names.items():
        assert ours[our_name] == theirs.eval[theirs_name], our_name
    assert 0 < ours["CIDEr-D"] and 0 < ours["METEOR"] < 1
    assert ours["num_images"] == 5
    with open(out_json) as f:
        assert json.load(f) == ours
    assert not os.path.exists(out_json + ".tmp")
    # clip asked without --clip_model: one line says so; no CLIPScore, and no silent zero
    skipped = [line for line in printed.splitlines() if "CLIPScore skipped" in line]
    assert len(skipped) == 1 and "--clip_model" in skipped[0]
    assert "CLIPScore" not in ours
    assert "| CIDEr-D |" in printed and "| METEOR |" in printed
