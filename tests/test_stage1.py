"""Stage 1 through its real `main`: overfitting, resume, checkpoints, bad input, two processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import train_stage1
import train_stage2
from errors import BadInput
from models.frozen_sd21 import FrozenSD
from models.vision_to_textemb import VisionToTextEmb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(path, n, size=16, seed=0):
    """n images of coloured blocks (enough structure for z to matter)."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[:] = rng.integers(0, 80, 3)
        x, y = rng.integers(0, size // 2, 2)
        img[y:y + size // 2, x:x + size // 2] = rng.integers(100, 255, 3)
        Image.fromarray(img).save(os.path.join(path, f"{i:03d}.png"))
    return path


def base_args(data_dir, sd_dir, out_dir, **overrides):
    args = dict(data_dir=data_dir, sd_model_id=sd_dir, output_dir=out_dir, image_size=16,
                backbone="toy", backbone_weights="none", encoder_width=32, encoder_layers=1,
                batch_size=2, lr=1e-3, lr_warmup_steps=1, max_steps=6, checkpointing_steps=3,
                validation_steps=0, num_validation_images=2, num_inference_steps=2,
                num_workers=0, seed=0, log_every=1, checkpoints_total_limit=0)
    args.update(overrides)
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    return argv


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("images")), 8)


def encoder_weights(path):
    return common.load_checkpoint(path, "stage1")["model"]


def test_loss_falls_when_overfitting(images_dir, tiny_sd_dir, tmp_path):
    out = str(tmp_path / "run")
    train_stage1.main(base_args(images_dir, tiny_sd_dir, out, max_steps=60, batch_size=4,
                                lr=3e-3, checkpointing_steps=60, subset_ratio=0.5))
    sd = FrozenSD.from_pretrained(tiny_sd_dir)
    ckpt = common.load_checkpoint(os.path.join(out, "vision_encoder_60.pt"), "stage1")
    trained = VisionToTextEmb.from_config(ckpt["config"]["encoder"])
    trained.load_state_dict(ckpt["model"])
    fresh = []
    for seed in range(3):
        torch.manual_seed(seed)
        fresh.append(VisionToTextEmb.from_config(ckpt["config"]["encoder"]))
    from data.coco import ImageFolderDataset
    ds = ImageFolderDataset(images_dir, image_size=16, subset_ratio=0.5, seed=0)
    images = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])

    def fixed_loss(encoder):  # the same noise and timesteps for both encoders
        torch.manual_seed(123)
        with torch.no_grad():
            latents = sd.encode_images(images)
            return sum(sd.loss(latents, encoder(images)).item() for _ in range(16)) / 16

    # The tiny random UNet listens to its conditioning only a little: even a free z optimised
    # directly lowers this loss by about 5%. So: clearly below every untrained encoder.
    before, after = min(fixed_loss(e) for e in fresh), fixed_loss(trained)
    assert after < before - 0.02, (before, after)


@pytest.mark.parametrize("cache,precision", [(False, "no"), (True, "no"), (True, "bf16")])
def test_resumed_run_equals_uninterrupted(images_dir, tiny_sd_dir, tmp_path, cache, precision):
    # Batch 2 of 8 images: 4 steps per epoch, so step 3 is mid-epoch and step 6 in the next one.
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_stage1.main(base_args(images_dir, tiny_sd_dir, straight, mixed_precision=precision))
    os.makedirs(resumed)
    # A run killed after its step-3 checkpoint: only that file survives.
    os.link(os.path.join(straight, "vision_encoder_3.pt"), os.path.join(resumed, "vision_encoder_3.pt"))
    extra = {"resume_from": "latest", "mixed_precision": precision}
    argv = base_args(images_dir, tiny_sd_dir, resumed, **extra) + (["--cache_latents"] if cache else [])
    assert train_stage1.main(argv) == 6
    a = encoder_weights(os.path.join(straight, "vision_encoder_6.pt"))
    b = encoder_weights(os.path.join(resumed, "vision_encoder_6.pt"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and training did change the weights
    c = encoder_weights(os.path.join(straight, "vision_encoder_3.pt"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resuming_past_max_steps_says_so(images_dir, tiny_sd_dir, tmp_path):
    out = str(tmp_path / "run")
    train_stage1.main(base_args(images_dir, tiny_sd_dir, out, max_steps=3))
    with pytest.raises(BadInput, match=r"vision_encoder_3.pt is at step 3, past --max_steps 2; pass "
                                         r"--max_steps 3 or more to go on from it, or a new --output_dir"):
        train_stage1.main(base_args(images_dir, tiny_sd_dir, out, max_steps=2, resume_from="latest"))
    assert train_stage1.main(base_args(images_dir, tiny_sd_dir, out, max_steps=3, resume_from="latest")) == 3


def test_bf16_on_a_cpu_takes_the_math_attention_kernel():
    # SDPA's backend flags are global; the CPU dispatch reads the same ones as CUDA's.
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before = [f() for f in flags]
    with common.attention_kernel("cpu", "bf16"):
        assert [f() for f in flags] == [False, True]
    assert [f() for f in flags] == before
    for device, precision in [("cpu", "no"), ("cuda", "bf16"), ("cuda", "fp16")]:
        with common.attention_kernel(device, precision):
            assert [f() for f in flags] == before, (device, precision)


def test_toy_preset_caches_latents_unless_told_not_to(tmp_path):
    argv = ["--preset", "toy", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path)]
    assert train_stage1.parse_args(argv).cache_latents
    assert not train_stage1.parse_args(argv + ["--no-cache_latents"]).cache_latents
    assert not train_stage1.parse_args(argv[2:]).cache_latents


@pytest.mark.parametrize("preset", sorted(common.PRESETS))
def test_presets_parse_and_never_set_a_flag_that_cannot_be_unset(preset, tmp_path, monkeypatch):
    argv = ["--preset", preset, "--data_dir", str(tmp_path), "--output_dir", str(tmp_path)]
    assert train_stage1.parse_args(argv).preset == preset
    assert train_stage2.parse_args(argv + ["--stage1_ckpt", "s1.pt"]).preset == preset
    monkeypatch.setitem(common.PRESETS[preset], "stage2", {**common.PRESETS[preset].get("stage2", {}),
                                                          "lora": True, "finetune_lm": False})
    with pytest.raises(ValueError, match=f"preset '{preset}' sets --lora, a store_true flag"):
        train_stage2.parse_args(argv + ["--stage1_ckpt", "s1.pt"])


def test_outputs_and_checkpoint_limit(images_dir, tiny_sd_dir, tmp_path):
    out = str(tmp_path / "run")
    train_stage1.main(base_args(images_dir, tiny_sd_dir, out, max_steps=4, checkpointing_steps=1,
                                checkpoints_total_limit=2, validation_steps=2, num_validation_images=3))
    assert common.list_checkpoints(out, "vision_encoder") == [
        os.path.join(out, "vision_encoder_3.pt"), os.path.join(out, "vision_encoder_4.pt")]
    assert json.load(open(os.path.join(out, "args.json")))["max_steps"] == 4
    grid = Image.open(os.path.join(out, "reconstructions_4.png"))
    assert grid.size == (2 * 18 + 2, 3 * 18 + 2)  # 3 rows of original | reconstruction, 2 px padding
    assert os.path.exists(os.path.join(out, "reconstructions_2.png"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    ckpt = common.load_checkpoint(os.path.join(out, "vision_encoder_4.pt"), "stage1")
    assert ckpt["step"] == 4 and set(ckpt) >= {"model", "optimizer", "lr_scheduler", "scaler", "ema",
                                                  "epoch", "config", "rng"}


def test_ema_weights_are_saved(images_dir, tiny_sd_dir, tmp_path):
    out = str(tmp_path / "run")
    train_stage1.main(base_args(images_dir, tiny_sd_dir, out, max_steps=2, checkpointing_steps=2)
                      + ["--use_ema", "--ema_decay", "0.5"])
    ckpt = common.load_checkpoint(os.path.join(out, "vision_encoder_2.pt"), "stage1")
    assert len(ckpt["ema"]["shadow_params"]) == len(ckpt["model"])


def test_missing_data_dir_is_one_line(tiny_sd_dir, tmp_path):
    with pytest.raises(BadInput, match="--data_dir is required"):
        train_stage1.main(["--output_dir", str(tmp_path)])
    with pytest.raises(BadInput, match="does not exist"):
        train_stage1.main(base_args(str(tmp_path / "nope"), tiny_sd_dir, str(tmp_path / "o")))


def test_checkpoint_of_another_kind_is_refused(images_dir, tiny_sd_dir, tmp_path):
    bad = str(tmp_path / "captioner_3.pt")
    common.save_checkpoint(bad, {"kind": "stage2", "model": {}})
    with pytest.raises(BadInput, match="is a stage2 checkpoint, not a stage1 one"):
        train_stage1.main(base_args(images_dir, tiny_sd_dir, str(tmp_path / "o"), resume_from=bad))
    junk = str(tmp_path / "junk.pt")
    open(junk, "wb").write(b"not a checkpoint")
    with pytest.raises(BadInput, match="not a checkpoint this project can read"):
        common.load_checkpoint(junk, "stage1")


def test_corrupt_image_is_skipped_and_counted(tiny_sd_dir, tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "imgs"), 6)
    open(os.path.join(data, "999_corrupt.png"), "wb").write(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match="999_corrupt.png"):
        train_stage1.main(base_args(data, tiny_sd_dir, str(tmp_path / "o"), max_steps=4,
                                    batch_size=7, checkpointing_steps=4))
    assert "skipped 1 unreadable images" in capsys.readouterr().err
    assert json.load(open(os.path.join(str(tmp_path / "o"), "summary.json")))["skipped_images"] == 1


def test_two_processes_train_in_sync(images_dir, tiny_sd_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_stage1.py")] + base_args(images_dir, tiny_sd_dir, out, max_steps=2,
                                                               checkpointing_steps=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["num_processes"] == 2
    assert len(set(summary["param_fingerprints"])) == 1  # DDP kept the two copies equal, bit for bit
    assert os.listdir(out).count("vision_encoder_2.pt") == 1


def test_tensorboard_logging(images_dir, tiny_sd_dir, tmp_path):
    out = str(tmp_path / "tb")
    train_stage1.main(base_args(images_dir, tiny_sd_dir, out, max_steps=2, checkpointing_steps=2)
                      + ["--report_to", "tensorboard"])
    events = [f for _, _, files in os.walk(os.path.join(out, "logs")) for f in files if "tfevents" in f]
    assert events


def test_checkpoint_loads_from_another_working_directory(images_dir, tiny_sd_dir, tmp_path, monkeypatch):
    """A run given relative paths records its local SD folder absolute: infer.py and stage 2 load
    the checkpoint from wherever they are run."""
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tiny_sd_dir, work / "sd")
    monkeypatch.chdir(work)
    train_stage1.main(base_args(images_dir, "sd", "run", max_steps=1, checkpointing_steps=1))
    monkeypatch.chdir(tmp_path)
    encoder, sd, config, _ = common.load_stage1(str(work / "run"), "cpu")  # the run's folder: its newest
    assert config["sd_model_id"] == str(work / "sd") and sd.seq_len == encoder.config["seq_len"]
