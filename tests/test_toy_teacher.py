"""The toy teacher trains end to end on a tiny budget and saves a folder every SD loader reads.
(Whether it draws well is a benchmark, not a test.)"""
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from data import toy_world
from data.coco import read_captions
from errors import BadInput
from models import toy_teacher
from scripts import train_toy_teacher as train_teacher

TINY = ["--vae_steps", "3", "--vae_batch_size", "4", "--vae_channels", "8,16",
        "--clip_steps", "2", "--clip_batch_size", "4",
        "--max_steps", "3", "--batch_size", "4", "--lr_warmup_steps", "1",
        "--unet_channels", "16,32", "--unet_attn", "1,1", "--text_width", "32", "--text_layers", "1",
        "--num_samples_eval", "4", "--num_inference_steps", "2", "--num_grid", "4", "--log_every", "1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    data = str(root / "data")
    toy_world.generate(data, num_train=24, num_val=6, seed=0)
    out = str(root / "teacher")
    metrics = train_teacher.main(["--data_dir", data, "--output_dir", out, "--seed", "1", *TINY])
    return root, data, out, metrics


def test_folder_loads_as_stable_diffusion(teacher):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root, _, out, _ = teacher
    for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(out, part)), part
    assert os.path.isfile(os.path.join(out, "model_index.json"))
    assert not [p for p in os.listdir(root) if ".tmp-" in p or ".old-" in p]  # swapped in whole

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.safety_checker is None
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    # 32 px images, one VAE downsampling: 16x16 latents; scaling_factor measured, not SD's
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 32
    assert vae.config.scaling_factor != 0.18215 and 0 < vae.config.scaling_factor < 1e3
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 32
    assert text_encoder.config.max_position_embeddings == 16
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.rescale_betas_zero_snr  # t=T is pure noise, as sampling assumes

    tokenizer = AutoTokenizer.from_pretrained(out, subfolder="tokenizer")
    assert tokenizer.model_max_length == 16
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(text_encoder.config, key) == getattr(tokenizer, key), key
    caption = "picture of a large yellow triangle to the right of a small white square"
    ids = tokenizer(caption).input_ids
    assert len(ids) <= 16
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    padded = tokenizer([caption, ""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert padded.shape == (2, 16)
    assert padded[1, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]

    # the diffusers pipeline itself draws 32x32 images from a caption
    image = pipe(caption, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


def test_frozen_sd_wrapper_loads_it(teacher):
    from models.frozen_sd21 import FrozenSD

    sd = FrozenSD.from_pretrained(teacher[2])
    assert (sd.seq_len, sd.embed_dim) == (16, 32)
    cond = sd.embed_text(["a small red circle on the left"])
    assert cond.shape == (1, 16, 32)
    images = sd.generate(cond, num_inference_steps=2, guidance_scale=3.0)
    assert images.shape == (1, 3, 32, 32)


def test_metrics_and_grid_written(teacher):
    _, data, out, metrics = teacher
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["samples"] == metrics["samples"]
    assert saved["samples"]["overall"]["num_images"] == 4
    # the judged numbers are those of the saved folder: sampled again with the same seed, the same
    images, captions = read_captions(os.path.join(data, "annotations", "captions_val2017.json"))
    again = train_teacher.judge(*train_teacher.evaluate_folder(
        out, list(images.values()), captions, num_samples=4, num_inference_steps=2, seed=1)[:2])[1]
    assert again == saved["samples"]
    assert "vae_reconstruction" in saved and saved["timings"]["total_s"] > 0
    from PIL import Image
    with Image.open(os.path.join(out, "samples.png")) as grid:  # 4 samples of 96 px in one row of 6 cells
        assert grid.size[0] == 6 * (96 + 2) + 2 and grid.size[1] > 96


def test_rerun_replaces_the_folder_epsilon_bf16(teacher, tmp_path):
    _, data, first, _ = teacher
    out = str(tmp_path / "teacher")
    shutil.copytree(first, out)
    # an existing teacher is replaced whole by a new run
    train_teacher.main(["--data_dir", data, "--output_dir", out, "--seed", "2", "--prediction_type",
                        "epsilon", *TINY, "--max_steps", "1", "--vae_steps", "1",
                        "--mixed_precision", "bf16", "--two_object_weight", "3", "--snr_gamma", "5"])
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    # epsilon cannot be predicted at zero SNR, so SD's schedule is kept as it is
    assert config["prediction_type"] == "epsilon" and not config["rescale_betas_zero_snr"]
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["args"]["seed"] == 2


def weights(folder, part):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, part, "diffusion_pytorch_model.safetensors" if part != "text_encoder"
                                  else "model.safetensors"))


def test_killed_run_resumes_to_the_same_teacher(teacher, tmp_path, monkeypatch):
    _, data, _, _ = teacher
    argv = ["--data_dir", data, "--seed", "3", *TINY, "--max_steps", "5", "--checkpointing_steps", "2",
            "--num_samples_eval", "0"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    train_teacher.main([*argv, "--output_dir", straight])
    assert not os.path.exists(straight + ".checkpoints")  # removed once the teacher is saved

    # Killed during UNet step 4 (after the step-2 checkpoint): no teacher, one checkpoint.
    calls = []
    real = train_teacher.loss_weights

    def dies_at_step_4(*a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(train_teacher, "loss_weights", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_teacher.main([*argv, "--output_dir", killed])
    monkeypatch.setattr(train_teacher, "loss_weights", real)
    assert not os.path.exists(killed)
    assert os.listdir(killed + ".checkpoints") == ["teacher_2.pt"]

    with pytest.raises(BadInput, match=r"other settings \(--lr 0.001\); resume with those"):
        train_teacher.main([*argv, "--output_dir", killed, "--resume_from", "latest", "--lr", "5e-3"])
    before = torch.load(os.path.join(killed + ".checkpoints", "teacher_2.pt"), weights_only=True)["timings"]
    start = time.time()
    train_teacher.main([*argv, "--output_dir", killed, "--resume_from", "latest"])
    wall = time.time() - start
    with open(os.path.join(killed, "metrics.json")) as f:
        total = json.load(f)["timings"]["total_s"]
    # The run's time counts the killed process up to its checkpoint as well as the resumed one.
    assert before["total_s"] + wall - 1.0 <= total <= before["total_s"] + wall + 0.1
    for part in ("unet", "vae", "text_encoder"):
        a, b = weights(straight, part), weights(killed, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert not os.path.exists(killed + ".checkpoints")


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_min_snr_weights(prediction_type):
    scheduler = toy_teacher.build_scheduler(prediction_type)
    t = torch.arange(0, 1000, 37)
    a = scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)
    got = train_teacher.loss_weights(scheduler, t, 5.0).double()
    if prediction_type == "v_prediction":  # the v error is the x0 error times (SNR + 1)
        torch.testing.assert_close(got, snr.clamp(max=5) / (snr + 1), rtol=1e-4, atol=1e-6)
        assert got[-1] < 1e-3  # near zero terminal SNR the x0 error is worth nothing
    else:  # the noise error is the x0 error times SNR: low-noise steps weigh gamma / SNR, the rest 1
        torch.testing.assert_close(got, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)), rtol=1e-4, atol=1e-6)
    assert torch.equal(train_teacher.loss_weights(scheduler, t, 0.0), torch.ones(len(t)))


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_vae_overfits_a_few_scenes(precision):
    """Phase 1 on four toy scenes: the reconstruction error falls, in bf16 (autocast) as in fp32,
    and the weights stay fp32."""
    import torch.nn.functional as F
    args = train_teacher.parse_args(["--vae_channels", "8,16", "--latent_channels", "4", "--vae_steps", "60",
                                     "--vae_batch_size", "4", "--log_every", "1000",
                                     "--mixed_precision", precision])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(np.stack([np.asarray(toy_world.render_scene(toy_world.sample_scene(rng), rng))
                                        for _ in range(4)])).permute(0, 3, 1, 2).contiguous()
    vae = toy_teacher.build_vae(image_size=32, channels=(8, 16), latent_channels=4)

    def error():
        x = train_teacher.to_model(pixels)
        with torch.no_grad():
            return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()

    before = error()
    train_teacher.train_vae(args, vae, pixels, torch.Generator().manual_seed(0))
    assert error() < 0.3 * before
    assert all(p.dtype == torch.float32 for p in vae.parameters())


def test_contrastive_pretraining_matches_captions_to_latents():
    """Phase 2 on four scenes with distinct captions: every caption ends up nearest its own image."""
    args = train_teacher.parse_args(["--text_width", "32", "--text_layers", "1", "--clip_steps", "60",
                                     "--clip_batch_size", "4", "--clip_lr", "3e-3", "--log_every", "1000"])
    captions = ["a small red circle on the left", "a large blue square on the right",
                "a small green triangle at the top", "a large white circle at the bottom"]
    tokenizer = toy_teacher.build_tokenizer(captions, args.max_length)
    tokens = toy_teacher.tokenize(tokenizer, captions, args.max_length)[:, None]   # [4,1,L]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen)
    text_encoder = toy_teacher.build_text_encoder(tokenizer, width=args.text_width, layers=args.text_layers,
                                                  max_length=args.max_length)
    before = text_encoder.final_layer_norm.weight.clone()
    assert train_teacher.pretrain_text_encoder(args, text_encoder, latents, tokens, gen) == 1.0
    assert not torch.equal(before, text_encoder.final_layer_norm.weight)


def test_text_encoder_is_frozen_after_pretraining(tmp_path, monkeypatch):
    """With --text_encoder_lr_scale 0 (the default, as SD freezes CLIP) the saved text encoder is
    exactly the one phase 2 produced; with a scale > 0 the diffusion loss moves it."""
    from transformers import CLIPTextModel

    data = str(tmp_path / "data")
    toy_world.generate(data, num_train=8, num_val=2, seed=0)
    after_phase2 = {}
    pretrain = train_teacher.pretrain_text_encoder

    def recording(args, text_encoder, latents, tokens, gen):
        acc = pretrain(args, text_encoder, latents, tokens, gen)
        after_phase2[args.output_dir] = {k: v.clone() for k, v in text_encoder.state_dict().items()}
        return acc

    monkeypatch.setattr(train_teacher, "pretrain_text_encoder", recording)
    for scale in ("0", "1"):
        out = str(tmp_path / f"teacher{scale}")
        train_teacher.main(["--data_dir", data, "--output_dir", out, *TINY, "--num_samples_eval", "2",
                            "--text_encoder_lr_scale", scale, "--ema_decay", "0"])
        saved = CLIPTextModel.from_pretrained(out, subfolder="text_encoder").state_dict()
        same = all(torch.equal(saved[k], v) for k, v in after_phase2[out].items())
        assert same == (scale == "0"), scale


def test_missing_data_is_one_line(tmp_path):
    with pytest.raises(BadInput) as e:
        train_teacher.main(["--data_dir", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "t")])
    assert "data.toy_world" in str(e.value) and "\n" not in str(e.value)


def test_no_samples_judged_still_saves_the_teacher(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "teacher")
    toy_world.generate(data, num_train=8, num_val=2, seed=0)
    train_teacher.main(["--data_dir", data, "--output_dir", out, *TINY, "--num_samples_eval", "0"])
    assert os.path.isfile(os.path.join(out, "model_index.json"))
    assert not os.path.exists(os.path.join(out, "samples.png"))


def test_gradient_checkpointing_trains_the_same_teacher(teacher, tmp_path):
    _, data, _, _ = teacher
    argv = ["--data_dir", data, "--seed", "4", *TINY, "--num_samples_eval", "0"]
    plain, checkpointed = str(tmp_path / "plain"), str(tmp_path / "checkpointed")
    train_teacher.main([*argv, "--output_dir", plain])
    train_teacher.main([*argv, "--output_dir", checkpointed, "--gradient_checkpointing"])
    for part in ("unet", "text_encoder"):
        a, b = weights(plain, part), weights(checkpointed, part)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], msg=f"{part}.{key}")
