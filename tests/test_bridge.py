"""The diffusion bridge (models/bridge.py), train_diffusion_bridge.py, train_stage2.py --text_only
and the bridge as --enhancer of infer.py and eval_captioning.py, through their real `main`."""
import json
import os
import shutil

import pytest
import torch

import common
import eval_captioning
import infer
import train_diffusion_bridge
import train_stage2
from conftest import argv_of, needs_java, reset_accelerator_state
from errors import BadInput
from models.bridge import Bridge, bridge_timesteps, default_config, modality_mean, normalize


def tiny_bridge(layout="sequence", seq_len=4, dim=16, **kw):
    return Bridge(default_config(seq_len, dim, layout=layout, unet_dim=8, dim_mults=[1, 2], **kw))


# ---------------------------------------------------------------------------------------------
# The pieces

def test_the_bridge_makes_steps_unet_calls_at_the_papers_timesteps():
    assert bridge_timesteps(600, 5) == [599, 479, 359, 239, 119, -1]
    assert bridge_timesteps(400, 5) == [399, 319, 239, 159, 79, -1]  # the decoder's augmentation
    for layout in ("sequence", "token"):
        bridge = tiny_bridge(layout)
        calls = []
        bridge.unet.register_forward_hook(lambda m, inputs, out: calls.append(inputs[1]))
        out = bridge.bridge(torch.randn(3, 4, 16), t0=600, steps=5)
        per_call = 3 if layout == "sequence" else 3 * 4  # each token is a row of its own
        assert [c.tolist() for c in calls] == [[float(t)] * per_call for t in (599, 479, 359, 239, 119)]
        assert out.shape == (3, 4, 16)
        norms = out.flatten(1).norm(dim=1) if layout == "sequence" else out.norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # normalize(x0)
        calls.clear()
        bridge.bridge(torch.randn(3, 4, 16), t0=600, steps=0)  # the mean shift alone
        assert calls == []


def test_normalisation_round_trips():
    torch.manual_seed(0)
    text, visual = torch.randn(50, 4, 16) + 3, torch.randn(40, 4, 16) * 2 - 1
    for layout in ("sequence", "token"):
        t_mean, v_mean = modality_mean(text, layout), modality_mean(visual, layout)
        assert torch.allclose(t_mean, normalize(text, layout).mean(0))
        bridge = tiny_bridge(layout)
        bridge = Bridge(bridge.config, t_mean, v_mean)
        x = bridge.centre(text, "text")
        expected = 5 * normalize(normalize(text, layout) - t_mean, layout)
        assert torch.allclose(x, expected)
        assert torch.allclose(bridge.rescale(x), x, atol=1e-5)  # at norm scale already: a fixed point
        # each side centred by its own mean: the centred visual vectors average to ~0
        assert bridge.centre(visual, "visual").mean(0).abs().max() < bridge.centre(visual, "text").mean(0).abs().max()
        again = Bridge(bridge.config)
        again.load_state_dict(bridge.state_dict())  # the means travel with the weights
        assert torch.equal(again.text_mean, t_mean) and torch.equal(again.visual_mean, v_mean)
        assert torch.allclose(again.bridge(visual[:2], 600, 2), bridge.bridge(visual[:2], 600, 2))


def test_ddpm_overfits_a_few_vectors():
    torch.manual_seed(0)
    bridge = tiny_bridge(loss_weight="none")
    data = bridge.rescale(torch.randn(4, 4, 16))  # four centred "captions"
    noised = bridge.rescale(bridge.scheduler.add_noise(data, torch.randn_like(data), torch.full((4,), 399)))

    def recovered():
        out = bridge.denoise(noised, 400, 5)
        return torch.nn.functional.cosine_similarity(out.flatten(1), data.flatten(1)).mean().item()

    before = recovered()
    optimizer = torch.optim.Adam(bridge.unet.parameters(), lr=3e-3)
    for _ in range(300):
        loss = bridge(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = recovered()
    start = torch.nn.functional.cosine_similarity(noised.flatten(1), data.flatten(1)).mean().item()
    assert after > 0.9 and after > start + 0.2 and after > before + 0.2, (start, before, after)


# ---------------------------------------------------------------------------------------------
# The scripts on the tiny world

def bridge_argv(world, out, **overrides):
    kwargs = dict(stage1_ckpt=world["stage1"], data_dir=world["data"], output_dir=out, unet_dim=8,
                  dim_mults="1,2", batch_size=8, lr=1e-3, lr_warmup_steps=1, max_steps=4, checkpointing_steps=2,
                  validation_steps=2, num_val_images=4, feature_batch_size=8, checkpoints_total_limit=0,
                  log_every=1, bridge_steps=2)
    kwargs.update(overrides)
    return argv_of(**{k: v for k, v in kwargs.items() if v is not None})


def train_bridge(world, name, **overrides):
    out = str(world["root"] / name)
    reset_accelerator_state()
    train_diffusion_bridge.main(bridge_argv(world, out, **overrides))
    return out


@pytest.fixture(scope="module")
def bridge_run(tiny_world):
    return train_bridge(tiny_world, "bridge")


def test_bridge_run_writes_checkpoints_with_its_means(tiny_world, bridge_run, capsys):
    names = set(os.listdir(bridge_run))
    assert {"bridge_2.pt", "bridge_4.pt", "features.safetensors", "config.json"} <= names
    ckpt = common.load_checkpoint(os.path.join(bridge_run, "bridge_4.pt"), "bridge")
    config = ckpt["config"]
    assert config["bridge"]["seq_len"] == 16 and config["bridge"]["dim"] == 32
    assert config["encoder_fingerprint"] == config["stage1_fingerprint"]
    bridge = common.bridge_of(ckpt)
    from safetensors.torch import load_file
    feats = load_file(os.path.join(bridge_run, "features.safetensors"))
    assert feats["text"].shape[0] == 5 * feats["cond"].shape[0]  # every caption of every image
    assert torch.allclose(bridge.text_mean, modality_mean(feats["text"], "sequence"), atol=1e-6)
    assert torch.allclose(bridge.visual_mean, modality_mean(feats["cond"], "sequence"), atol=1e-6)
    assert not torch.equal(bridge.text_mean, bridge.visual_mean)


def test_the_text_encoder_fingerprint_ignores_the_precision_it_runs_in(tiny_world, bridge_run):
    # A bridge trained with SD in fp32 must serve a stage 2 that loads SD in bf16 (auto on AMX CPUs).
    ckpt = common.load_checkpoint(os.path.join(bridge_run, "bridge_4.pt"), "bridge")
    for dtype in (torch.float32, torch.bfloat16):
        _, sd, _, _ = common.load_stage1(tiny_world["stage1"], "cpu", dtype)
        assert sd.text_encoder.dtype == dtype
        assert common.text_encoder_fingerprint(sd) == ckpt["config"]["text_encoder_fingerprint"]


def test_bridge_resumed_run_equals_uninterrupted(tiny_world, bridge_run, tmp_path, capsys):
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    os.link(os.path.join(bridge_run, "bridge_2.pt"), os.path.join(out, "bridge_2.pt"))
    shutil.copy(os.path.join(bridge_run, "features.safetensors"), out)
    reset_accelerator_state()
    train_diffusion_bridge.main(bridge_argv(tiny_world, out, resume_from="latest"))
    assert "features: reusing" in capsys.readouterr().err
    full = common.load_checkpoint(os.path.join(bridge_run, "bridge_4.pt"), "bridge")
    resumed = common.load_checkpoint(os.path.join(out, "bridge_4.pt"), "bridge")
    assert common.fingerprint(full["model"]) == common.fingerprint(resumed["model"])
    ema = lambda ckpt: common.fingerprint({str(i): p for i, p in enumerate(ckpt["ema"]["shadow_params"])})  # noqa: E731
    assert ema(full) == ema(resumed)


def unreadable_copy(world, tmp_path):
    """The tiny world's data with every image replaced by bytes no image reader accepts."""
    data = str(tmp_path / "data")
    shutil.copytree(world["data"], data)
    for split in ("train2017", "val2017"):
        for name in os.listdir(os.path.join(data, split)):
            with open(os.path.join(data, split, name), "wb") as f:
                f.write(b"not an image")
    return data


def text_only_argv(world, out, data=None, **overrides):
    kwargs = dict(text_only=True, stage1_ckpt=world["stage1"], llm=world["gpt2"], data_dir=data or world["data"],
                  output_dir=out, batch_size=4, lr=1e-3, lr_warmup_steps=1, max_steps=2, max_new_tokens=6,
                  num_workers=0, validation_steps=0, num_validation_images=1)
    kwargs.update(overrides)
    return argv_of(**{k: v for k, v in kwargs.items() if v is not None})


@pytest.fixture(scope="module")
def text_captioner(tiny_world, bridge_run, tmp_path_factory):
    """A text-only captioner on the bridge's text space, trained with its augmentation and CapDec
    noise from a data dir whose images are all unreadable."""
    root = tmp_path_factory.mktemp("text_only")
    data = unreadable_copy(tiny_world, root)
    out = str(root / "stage2_text")
    reset_accelerator_state()
    train_stage2.main(text_only_argv(tiny_world, out, data, bridge_ckpt=bridge_run, bridge_aug_t0=400,
                                     bridge_aug_steps=2, text_noise_std=0.5))
    return out


def test_text_only_reads_no_image_and_keeps_the_bridges_text_space(tiny_world, bridge_run, text_captioner):
    ckpt = common.load_checkpoint(os.path.join(text_captioner, "captioner_2.pt"), "stage2")
    space = ckpt["config"]["text_space"]
    assert space["norm"] == "center" and space["bridge_aug_t0"] == 400 and space["noise_std"] == 0.5
    bridge = common.load_checkpoint(os.path.join(bridge_run, "bridge_4.pt"), "bridge")
    assert torch.equal(ckpt["model"]["text_mean"], bridge["model"]["text_mean"])
    assert "encoder" not in ckpt["model"]  # the encoder stays stage 1's
    assert json.load(open(os.path.join(text_captioner, "summary.json")))["skipped_images"] == 0
    from safetensors.torch import load_file
    assert load_file(os.path.join(text_captioner, "augmented.safetensors"))["augmented"].shape[1:] == (16, 32)


def val_image(world):
    return os.path.join(world["data"], "val2017", sorted(os.listdir(os.path.join(world["data"], "val2017")))[0])


def infer_argv(world, stage2, *extra, **kw):
    kwargs = dict(stage1_ckpt=world["stage1"], stage2_ckpt=stage2, max_new_tokens=6, num_beams=2,
                  image_path=val_image(world))
    kwargs.update(kw)
    return argv_of(**kwargs) + list(extra)


def test_infer_with_the_bridge_and_the_mean_shift(tiny_world, bridge_run, text_captioner):
    vlv = common.load_vlv(tiny_world["stage1"], text_captioner)
    calls = []
    for steps in (0, 3):
        args = infer.parse_args(infer_argv(tiny_world, text_captioner, enhancer=bridge_run, bridge_steps=steps))
        common.load_enhancer(args, vlv)
        hook = vlv.enhancer.bridge.unet.register_forward_hook(lambda *a: calls.append(1))
        prefix = vlv.prefix(torch.rand(2, 3, 16, 16))
        hook.remove()
        assert len(calls) == steps
        calls.clear()
        assert torch.allclose(prefix.flatten(1).norm(dim=1), torch.full((2,), 5.0), atol=1e-4)  # the training norm
    captions = infer.main(infer_argv(tiny_world, text_captioner, enhancer=bridge_run))
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_bridge_refusals_are_one_line(tiny_world, bridge_run, text_captioner, tmp_path):
    other = train_bridge(tiny_world, "bridge_other_encoder", stage1_ckpt=tiny_world["other1"], max_steps=2,
                         val_split="none")
    ckpt = torch.load(os.path.join(bridge_run, "bridge_4.pt"), weights_only=True)
    ckpt["config"]["text_encoder_fingerprint"] = "0" * 16
    torch.save(ckpt, tmp_path / "other_text_encoder.pt")
    plain = str(tmp_path / "stage2_plain_text")
    reset_accelerator_state()
    train_stage2.main(text_only_argv(tiny_world, plain, text_norm="none"))
    cases = [
        (text_captioner, other, "built on the z of another encoder"),
        (text_captioner, str(tmp_path / "other_text_encoder.pt"), "built on another SD text encoder"),
        (tiny_world["stage2"], bridge_run, "maps into the centred text space"),  # a captioner trained on images
        (plain, bridge_run, "maps into the centred text space"),
        (text_captioner, "none", "trained on centred text embeddings"),
    ]
    for stage2, enhancer, message in cases:
        kw = dict(stage1_ckpt=tiny_world["stage1"]) if stage2 != tiny_world["stage2"] else {}
        with pytest.raises(BadInput, match=message):
            infer.main(infer_argv(tiny_world, stage2, enhancer=enhancer, **kw))
    with pytest.raises(BadInput, match="--bridge_steps 601"):
        infer.main(infer_argv(tiny_world, text_captioner, enhancer=bridge_run, bridge_steps=601))
    with pytest.raises(BadInput, match="built on the z of another encoder"):  # a text-only run on another stage 1
        train_stage2.main(text_only_argv(tiny_world, str(tmp_path / "x"), bridge_ckpt=other))
    with pytest.raises(BadInput, match="--bridge_aug_t0 denoises the captions with a bridge"):
        train_stage2.parse_args(text_only_argv(tiny_world, str(tmp_path / "y"), bridge_aug_t0=400))


def test_visualize_draws_the_effect(tiny_world, bridge_run, tmp_path):
    out = str(tmp_path / "bridge_effect.png")
    effect = train_diffusion_bridge.main(argv_of(visualize=True, ckpt=bridge_run, data_dir=tiny_world["data"],
                                                 out=out, num_val_images=4, bridge_steps=2))
    from PIL import Image
    assert Image.open(out).size[0] > 500
    assert 0 <= effect["changed_to_right"] <= effect["changed"] <= 1
    assert effect["pairs"]["before"].shape == effect["pairs"]["after"].shape == (20,)


@needs_java
def test_eval_captioning_with_the_bridge(tiny_world, bridge_run, text_captioner, tmp_path):
    scores = eval_captioning.main(argv_of(stage1_ckpt=tiny_world["stage1"], stage2_ckpt=text_captioner,
                                          data_dir=tiny_world["data"], num_samples=4, metrics="bleu",
                                          max_new_tokens=6, num_sheet_images=0, enhancer=bridge_run,
                                          out_jsonl=str(tmp_path / "bridge.jsonl")))
    assert scores["num_images"] == 4


def test_text_only_resumed_run_equals_uninterrupted(tiny_world, tmp_path):
    runs = {}
    for name in ("full", "resumed"):
        out = str(tmp_path / name)
        argv = text_only_argv(tiny_world, out, text_noise_std=0.5, max_steps=4, checkpointing_steps=2,
                              checkpoints_total_limit=0)
        if name == "resumed":
            os.makedirs(out)
            os.link(os.path.join(runs["full"], "captioner_2.pt"), os.path.join(out, "captioner_2.pt"))
            argv += ["--resume_from", "latest"]
        reset_accelerator_state()
        train_stage2.main(argv)
        runs[name] = out
    ckpts = [common.load_checkpoint(os.path.join(runs[n], "captioner_4.pt"), "stage2") for n in runs]
    assert common.fingerprint(ckpts[0]["model"]["captioner"]) == common.fingerprint(ckpts[1]["model"]["captioner"])
