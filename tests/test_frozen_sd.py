"""The frozen SD wrapper on tiny SD folders saved in the real diffusers format."""
import os
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_SD_EMBED_DIM, TINY_SD_IMAGE_SIZE, TINY_SD_SEQ_LEN, TINY_VAE_SCALING
from errors import BadInput
from models.frozen_sd21 import FrozenSD, diffusion_target

CAPTIONS = ["a red circle on the left", "two blue squares"]


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return FrozenSD.from_pretrained(tiny_sd_dir)


def assert_one_line_exit(excinfo, *names):
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for name in names:
        assert name in message, message


def test_loads_from_folder(sd):
    assert (sd.seq_len, sd.embed_dim, sd.prediction_type) == (TINY_SD_SEQ_LEN, TINY_SD_EMBED_DIM, "epsilon")
    assert type(sd.tokenizer).__name__ == "CLIPTokenizer"
    assert sd.uncond.shape == (1, TINY_SD_SEQ_LEN, TINY_SD_EMBED_DIM)


def test_loads_by_hub_id_from_offline_cache(tiny_sd_dir, sd, hf_offline_cache):
    repo_id = "stabilityai/stable-diffusion-2-1-base"
    hf_offline_cache(tiny_sd_dir, repo_id)
    cached = FrozenSD.from_pretrained(repo_id)
    for a, b in zip(cached.state_dict().values(), sd.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(BadInput) as excinfo:  # offline and not cached
        FrozenSD.from_pretrained("stabilityai/stable-diffusion-2-1")
    assert_one_line_exit(excinfo, "stabilityai/stable-diffusion-2-1", "HF_HUB_OFFLINE")


def test_bad_inputs_give_one_line(tmp_path, tiny_sd_dir):
    with pytest.raises(BadInput) as excinfo:
        FrozenSD.from_pretrained(str(tmp_path / "nope"))
    assert_one_line_exit(excinfo, str(tmp_path / "nope"), "no such folder")
    with pytest.raises(BadInput) as excinfo:  # a folder, but not an SD one
        FrozenSD.from_pretrained(str(tmp_path))
    assert_one_line_exit(excinfo, str(tmp_path), "not a Stable Diffusion folder")
    with pytest.raises(BadInput) as excinfo:
        FrozenSD.from_pretrained(tiny_sd_dir, cond_mode="sideways")
    assert_one_line_exit(excinfo, "sideways")


def test_frozen_and_eval_even_after_train(sd):
    sd.train()
    assert not any(p.requires_grad for p in sd.parameters())
    assert not any(m.training for m in sd.modules())


@pytest.mark.parametrize("cond_mode", ["direct", "text_encoder"])
def test_gradient_reaches_z(sd, monkeypatch, cond_mode):
    monkeypatch.setattr(sd, "cond_mode", cond_mode)
    torch.manual_seed(0)
    latents = sd.encode_images(torch.rand(2, 3, TINY_SD_IMAGE_SIZE, TINY_SD_IMAGE_SIZE))
    z = torch.randn(2, sd.seq_len, sd.embed_dim, requires_grad=True)
    loss = sd.loss(latents, z)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd.parameters())


def hand_alphas_cumprod():
    """The tiny folders' schedule (SD's): scaled_linear betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_follows_prediction_type(tmp_path_factory, monkeypatch, prediction_type):
    from conftest import make_tiny_sd
    sd = FrozenSD.from_pretrained(make_tiny_sd(tmp_path_factory, prediction_type))
    assert sd.prediction_type == prediction_type
    seen = {}

    def zero_unet(noisy, timesteps, encoder_hidden_states):  # records what the UNet is given
        seen.update(noisy=noisy, timesteps=timesteps, cond=encoder_hidden_states)
        return types.SimpleNamespace(sample=torch.zeros_like(noisy))

    monkeypatch.setattr(sd.unet, "forward", zero_unet)
    x0 = torch.randn(3, 4, 8, 8)
    z = torch.randn(3, sd.seq_len, sd.embed_dim)
    torch.manual_seed(1)
    loss = sd.loss(x0, z)
    torch.manual_seed(1)  # replay the loss's draws: noise, then t
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (3,))
    assert torch.equal(seen["timesteps"], t)
    a = hand_alphas_cumprod()[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["noisy"], a.sqrt() * x0 + (1 - a).sqrt() * noise)
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(loss, F.mse_loss(torch.zeros_like(target), target))
    torch.testing.assert_close(diffusion_target(sd.noise_scheduler, x0, noise, t), target)
    torch.testing.assert_close(seen["cond"], sd.condition(z))


def test_condition_is_the_text_encoders_own_path(sd, monkeypatch):
    ids = sd.tokenizer(CAPTIONS, padding="max_length", max_length=sd.seq_len, truncation=True,
                       return_tensors="pt").input_ids
    assert (ids != sd.tokenizer.pad_token_id).sum() > 2 * len(CAPTIONS)  # real tokens, not padding
    token_embeds = sd.text_encoder.embeddings.token_embedding(ids)  # [B,L,D]
    expected = sd.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(sd.condition(token_embeds), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd.embed_text(CAPTIONS), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd.uncond, sd.embed_text([""]))
    monkeypatch.setattr(sd, "cond_mode", "direct")
    assert torch.equal(sd.condition(token_embeds), token_embeds)


def test_latents_use_the_vaes_scaling(sd):
    images = torch.rand(2, 3, TINY_SD_IMAGE_SIZE, TINY_SD_IMAGE_SIZE)
    mean, std = sd.latent_dist(images)
    with torch.no_grad():
        posterior = sd.vae.encode(images * 2 - 1).latent_dist
        decoded = sd.vae.decode(mean).sample
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(sd.sample_latents(mean, torch.zeros_like(std)), mean * TINY_VAE_SCALING)
    torch.testing.assert_close(sd.decode_latents(mean * TINY_VAE_SCALING), (decoded / 2 + 0.5).clamp(0, 1))
    assert sd.encode_images(images).shape == (2, 4, TINY_SD_IMAGE_SIZE // 2, TINY_SD_IMAGE_SIZE // 2)


def test_generate_is_seeded_and_in_range(sd):
    cond = torch.cat([sd.condition(torch.randn(1, sd.seq_len, sd.embed_dim)), sd.embed_text(CAPTIONS[:1])])
    a = sd.generate(cond, num_inference_steps=2, guidance_scale=2.0, seed=0)
    b = sd.generate(cond, num_inference_steps=2, guidance_scale=2.0, seed=0)
    c = sd.generate(cond, num_inference_steps=2, guidance_scale=2.0, seed=1)
    assert a.shape == (2, 3, TINY_SD_IMAGE_SIZE, TINY_SD_IMAGE_SIZE) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_weights_still_train_a_float32_z(tiny_sd_dir):
    sd = FrozenSD.from_pretrained(tiny_sd_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in sd.parameters()} == {torch.bfloat16}
    latents = sd.encode_images(torch.rand(1, 3, TINY_SD_IMAGE_SIZE, TINY_SD_IMAGE_SIZE))
    z = torch.randn(1, sd.seq_len, sd.embed_dim, requires_grad=True)
    loss = sd.loss(latents, z)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert z.grad.dtype == torch.float32 and torch.isfinite(z.grad).all()


def test_word_level_tokenizer_folder_loads(tiny_sd_dir, tmp_path):
    """The toy teacher saves a word-level PreTrainedTokenizerFast; AutoTokenizer must load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "red", "circle", "on", "the", "left"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = str(tmp_path / "sd")
    shutil.copytree(tiny_sd_dir, folder)
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                            model_max_length=8).save_pretrained(os.path.join(folder, "tokenizer"))
    sd = FrozenSD.from_pretrained(folder)
    assert sd.seq_len == 8  # the tokenizer's length, under the encoder's 16 positions
    emb = sd.embed_text(CAPTIONS)
    assert emb.shape == (2, 8, TINY_SD_EMBED_DIM) and sd.uncond.shape == (1, 8, TINY_SD_EMBED_DIM)
    assert sd.generate(emb, num_inference_steps=1, seed=0).shape == (2, 3, 16, 16)
