"""Stage 2, infer.py and eval_captioning.py through their real `main`, on tiny saved models."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import eval_captioning
import infer
import train_stage1
import train_stage2
from conftest import argv_of, needs_java, reset_accelerator_state, save_tiny_gpt2, save_tiny_llama
from data import toy_world
from errors import BadInput


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_dir):
    """A tiny toy world, a stage-1 checkpoint on the tiny SD, and a tiny GPT-2."""
    root = tmp_path_factory.mktemp("stage2")
    data = str(root / "data")
    toy_world.generate(data, num_train=16, num_val=6, seed=0)
    stage1 = str(root / "stage1")
    reset_accelerator_state()
    train_stage1.main(argv_of(data_dir=data, sd_model_id=tiny_sd_dir, output_dir=stage1, image_size=16,
                              backbone="toy", backbone_weights="none", encoder_width=32, encoder_layers=1,
                              batch_size=4, max_steps=2, validation_steps=0, num_validation_images=1,
                              num_inference_steps=1, num_workers=0))
    return dict(root=root, data=data, stage1=os.path.join(stage1, "vision_encoder_2.pt"),
                gpt2=save_tiny_gpt2(root / "gpt2"))


def stage2_argv(world, out, **overrides):
    kwargs = dict(stage1_ckpt=world["stage1"], data_dir=world["data"], llm=world["gpt2"], output_dir=out,
                  batch_size=4, lr=1e-3, lr_warmup_steps=1, max_steps=6, checkpointing_steps=3,
                  validation_steps=0, num_validation_images=2, max_new_tokens=8, num_workers=0,
                  checkpoints_total_limit=0, log_every=1)
    kwargs.update(overrides)
    return argv_of(**kwargs)


@pytest.fixture(scope="module")
def stage2(world):
    out = str(world["root"] / "stage2")
    reset_accelerator_state()
    train_stage2.main(stage2_argv(world, out))
    return out


def test_stage2_writes_what_inference_needs(stage2):
    names = os.listdir(stage2)
    assert {"captioner_3.pt", "captioner_6.pt", "config.json", "args.json", "tokenizer.json"} <= set(names)
    config = json.load(open(os.path.join(stage2, "config.json")))
    assert config["captioner"]["llm"].endswith("gpt2") and config["prefix_source"] == "cond"
    ckpt = common.load_checkpoint(os.path.join(stage2, "captioner_6.pt"), "stage2")
    # the LM is frozen by default: only the projection is saved
    assert ckpt["model"]["captioner"] and all(k.startswith("proj") for k in ckpt["model"]["captioner"])
    assert "encoder" not in ckpt["model"]


def test_stage2_resumed_run_equals_uninterrupted(world, stage2, tmp_path):
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    os.link(os.path.join(stage2, "captioner_3.pt"), os.path.join(resumed, "captioner_3.pt"))
    assert train_stage2.main(stage2_argv(world, resumed, resume_from="latest")) == 6
    a = common.load_checkpoint(os.path.join(stage2, "captioner_6.pt"), "stage2")["model"]["captioner"]
    b = common.load_checkpoint(os.path.join(resumed, "captioner_6.pt"), "stage2")["model"]["captioner"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("caption_loss,precision", [("best_ref", "no"), ("posterior_ref", "no"),
                                                     ("posterior_ref", "bf16")])  # bf16: the toy preset's
def test_reference_picking_loss_trains_and_resumes_exactly(world, tmp_path, caption_loss, precision):
    """--caption_loss best_ref|posterior_ref reads every reference of each image of the batch; a
    resumed run still equals an unbroken one (posterior_ref's draws included), in bf16 too."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    argv = dict(caption_loss=caption_loss, finetune_lm=True, max_steps=4, checkpointing_steps=2,
                mixed_precision=precision)
    if precision == "bf16":  # as the toy pipeline trains it
        argv["finetune_encoder"] = True
    assert train_stage2.main(stage2_argv(world, full, **argv)) == 4
    os.makedirs(resumed)
    os.link(os.path.join(full, "captioner_2.pt"), os.path.join(resumed, "captioner_2.pt"))
    assert train_stage2.main(stage2_argv(world, resumed, resume_from="latest", **argv)) == 4
    a = common.load_checkpoint(os.path.join(full, "captioner_4.pt"), "stage2")["model"]["captioner"]
    b = common.load_checkpoint(os.path.join(resumed, "captioner_4.pt"), "stage2")["model"]["captioner"]
    assert any(k.startswith("lm.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_stage2_with_tiny_llama_and_lora(world, tmp_path):
    out = str(tmp_path / "llama")
    llama = save_tiny_llama(tmp_path / "llama_lm")
    train_stage2.main(stage2_argv(world, out, llm=llama, max_steps=2, checkpointing_steps=2, lora=True))
    keys = common.load_checkpoint(os.path.join(out, "captioner_2.pt"), "stage2")["model"]["captioner"]
    assert any("lora_" in k for k in keys) and any(k.startswith("proj") for k in keys)
    assert all("lora_" in k or k.startswith("proj") for k in keys)


def test_finetune_encoder_saves_its_weights(world, tmp_path):
    out = str(tmp_path / "ft")
    train_stage2.main(stage2_argv(world, out, max_steps=2, checkpointing_steps=2, finetune_encoder=True))
    enc = common.load_checkpoint(os.path.join(out, "captioner_2.pt"), "stage2")["model"]["encoder"]
    before = common.load_checkpoint(world["stage1"], "stage1")["model"]
    assert enc.keys() == before.keys()
    assert any(not torch.equal(enc[k], before[k]) for k in enc)


def test_encoder_lr_sets_the_encoders_own_rate(world, tmp_path):
    # --encoder_lr 0: the captioner learns at --lr while the fine-tuned encoder stays where stage 1 left it
    out = str(tmp_path / "enc_lr")
    train_stage2.main(stage2_argv(world, out, max_steps=2, checkpointing_steps=2, finetune_encoder=True,
                                  encoder_lr=0.0))
    ckpt = common.load_checkpoint(os.path.join(out, "captioner_2.pt"), "stage2")
    before = common.load_checkpoint(world["stage1"], "stage1")["model"]
    assert all(torch.equal(ckpt["model"]["encoder"][k], before[k]) for k in before)
    assert [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]] == [1e-3, 0.0]
    with pytest.raises(BadInput, match="encoder_lr"):  # a resume at another encoder rate is refused
        train_stage2.main(stage2_argv(world, out, max_steps=4, checkpointing_steps=2, finetune_encoder=True,
                                      encoder_lr=1e-3, resume_from="latest"))
    with pytest.raises(BadInput, match="--encoder_lr 0.001: the encoder is frozen in this run"):
        train_stage2.main(stage2_argv(world, str(tmp_path / "frozen"), max_steps=2, encoder_lr=1e-3))


def infer_argv(world, stage2, **kw):
    return argv_of(stage1_ckpt=world["stage1"], stage2_ckpt=os.path.join(stage2, "captioner_6.pt"),
                   num_beams=2, max_new_tokens=6, num_inference_steps=2, device="cpu", **kw)


@pytest.mark.parametrize("mode,size", [("L", (40, 30)), ("RGBA", (32, 32)), ("RGB", (3, 5)),
                                       ("RGB", (1500, 900)), ("P", (20, 20))])
def test_infer_on_odd_images(world, stage2, tmp_path, mode, size, capsys):
    path = str(tmp_path / "img.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) \
        .convert(mode).save(path)
    captions = infer.main(infer_argv(world, stage2, image_path=path))
    assert len(captions) == 1 and isinstance(captions[0], str)
    assert capsys.readouterr().out.strip() == captions[0].strip()


def test_infer_regenerates_from_caption_and_from_z(world, stage2, tmp_path):
    img = os.path.join(world["data"], "val2017", sorted(os.listdir(os.path.join(world["data"], "val2017")))[0])
    regen, recon = str(tmp_path / "regen.png"), str(tmp_path / "recon.png")
    infer.main(infer_argv(world, stage2, image_path=img, regen_image=True, out_image=regen,
                          recon_image=True, out_recon=recon))
    assert Image.open(regen).size == Image.open(recon).size == (16, 16)


def test_infer_image_dir_writes_jsonl_and_resumes(world, stage2, tmp_path):
    out = str(tmp_path / "caps.jsonl")
    folder = os.path.join(world["data"], "val2017")
    first = infer.main(infer_argv(world, stage2, image_dir=folder, out_jsonl=out, batch_size=4))
    lines = [json.loads(x) for x in open(out)]
    assert len(lines) == len(os.listdir(folder)) == len(first)
    again = infer.main(infer_argv(world, stage2, image_dir=folder, out_jsonl=out))
    assert again == first and len(open(out).readlines()) == len(lines)  # nothing captioned twice


def test_infer_refuses_a_stage1_checkpoint_it_was_not_trained_on(world, stage2, tmp_path):
    other = str(tmp_path / "other_stage1")
    train_stage1.main(argv_of(data_dir=world["data"], sd_model_id=json.load(open(os.path.join(
        os.path.dirname(world["stage1"]), "args.json")))["sd_model_id"], output_dir=other, image_size=16,
        backbone="toy", backbone_weights="none", encoder_width=32, encoder_layers=1, batch_size=4,
        max_steps=1, validation_steps=0, num_validation_images=1, num_inference_steps=1, num_workers=0, seed=1))
    img = os.path.join(world["data"], "val2017", sorted(os.listdir(os.path.join(world["data"], "val2017")))[0])
    argv = infer_argv(world, stage2, image_path=img)
    argv[argv.index("--stage1_ckpt") + 1] = os.path.join(other, "vision_encoder_1.pt")
    with pytest.raises(BadInput, match="was trained on the stage-1 weights of .* not on those in"):
        infer.main(argv)
    argv[argv.index("--stage2_ckpt") + 1] = world["stage1"]
    with pytest.raises(BadInput, match="is a stage1 checkpoint, not a stage2 one"):
        infer.main(argv)


@needs_java
def test_eval_captioning_model_mode_end_to_end(world, stage2, tmp_path):
    preds = str(tmp_path / "preds.jsonl")
    scores = eval_captioning.main(argv_of(
        stage1_ckpt=world["stage1"], stage2_ckpt=os.path.join(stage2, "captioner_6.pt"),
        data_dir=world["data"], split="val", num_samples=4, batch_size=2, num_beams=2, max_new_tokens=6,
        metrics="bleu,cider", out_jsonl=preds, device="cpu"))
    assert len(open(preds).readlines()) == 4
    assert scores["attribute_accuracy"]["overall"]["all"]["total"] == 4
    # model mode scores what it wrote: the same numbers as scoring the predictions file
    ann = os.path.join(world["data"], "annotations", "captions_val2017.json")
    again = eval_captioning.main(argv_of(preds_json=preds, ann_json=ann, metrics="bleu,cider", num_sheet_images=0))
    assert again["BLEU-4"] == scores["BLEU-4"] and again["CIDEr-D"] == scores["CIDEr-D"]
    assert again["attribute_accuracy"] == scores["attribute_accuracy"]


def test_baseline_without_stage1_trains_a_fresh_encoder(world, tmp_path):
    out = str(tmp_path / "baseline")
    train_stage2.main(stage2_argv(world, out, max_steps=2, checkpointing_steps=2, reinit_encoder=True))
    ckpt = common.load_checkpoint(os.path.join(out, "captioner_2.pt"), "stage2")
    stage1 = common.load_checkpoint(world["stage1"], "stage1")["model"]
    assert ckpt["config"]["reinit_encoder"] and ckpt["model"]["encoder"].keys() == stage1.keys()
    # far from the stage-1 weights: it started from a fresh initialisation, not from them
    assert sum((ckpt["model"]["encoder"][k] - stage1[k]).abs().sum() for k in stage1) > 1.0
    img = os.path.join(world["data"], "val2017", sorted(os.listdir(os.path.join(world["data"], "val2017")))[0])
    argv = argv_of(stage1_ckpt=world["stage1"], stage2_ckpt=os.path.join(out, "captioner_2.pt"),
                   image_path=img, num_beams=1, max_new_tokens=4, device="cpu")
    assert len(infer.main(argv)) == 1


def test_two_object_repeat_repeats_two_object_scenes_and_refuses_coco(world, tmp_path):
    from data.coco import CocoImageCaptionDataset
    ds = CocoImageCaptionDataset(world["data"], image_size=16)
    two = {i for i, info in ds.images_info.items() if len(info["scene"]["objects"]) == 2}
    assert two and len(two) < len(ds.images_info)
    before = [item for item in ds.items]
    ds.repeat_images({i: 3 for i in two})
    counted = lambda items, i: sum(item[0] == i for item in items)
    for i in ds.images_info:
        assert counted(ds.items, i) == counted(before, i) * (3 if i in two else 1)
    # the samples a run shows are of different images, however often one repeats
    assert len({x["image_id"] for x in common.validation_items(ds, 3)}) == 3
    assert train_stage2.main(stage2_argv(world, str(tmp_path / "rep"), max_steps=1, checkpointing_steps=1,
                                         two_object_repeat=3)) == 1
    # COCO images have no scene to count objects in: one line, naming the flag
    coco = tmp_path / "coco"
    os.makedirs(coco / "annotations")
    os.symlink(os.path.join(world["data"], "train2017"), coco / "train2017")
    ann = json.load(open(os.path.join(world["data"], "annotations", "captions_train2017.json")))
    for image in ann["images"]:
        image.pop("scene"), image.pop("heldout")
    json.dump(ann, open(coco / "annotations" / "captions_train2017.json", "w"))
    with pytest.raises(BadInput) as e:
        train_stage2.main(stage2_argv(world, str(tmp_path / "coco_out"), data_dir=str(coco), two_object_repeat=3))
    assert str(e.value).startswith("--two_object_repeat 3:") and "COCO" in str(e.value)
