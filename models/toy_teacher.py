"""The toy world's text-to-image teacher, a tiny Stable Diffusion built from diffusers and
transformers parts: the stand-in for SD 2.1 that scripts/train_toy_teacher.py trains and saves as
a diffusers SD folder (vae/ unet/ text_encoder/ tokenizer/ scheduler/).

    tokenizer     word-level over the toy captions, <bos> ... <eos>, padded to L (a fast tokenizer)
    text encoder  CLIPTextModel, L tokens -> [B, L, D]
    VAE           AutoencoderKL, 32x32x3 -> 8x8xC with two downsamplings
    UNet          UNet2DConditionModel on the latents, cross-attention to the text encoder's output
    scheduler     DDPMScheduler (v-prediction, zero terminal SNR by default)
Every builder takes keyword arguments only; nothing here reads a command line.
"""
import torch
import torch.nn as nn

from errors import BadInput

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}


def build_tokenizer(captions, max_length, extra_words=()):
    """Word-level tokenizer over the words of captions (and extra_words), wrapped as
    PreTrainedTokenizerFast: lower-cased, split on whitespace and punctuation, <bos> ... <eos>
    added, padded with <pad>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set(extra_words)
    for c in captions:
        words.update(c.lower().split())
    specials = [SPECIAL["pad"], SPECIAL["unk"], SPECIAL["bos"], SPECIAL["eos"]]
    vocab = {t: i for i, t in enumerate(specials + sorted(words - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL["bos"], SPECIAL["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"], model_max_length=max_length, padding_side="right")


def tokenize(tokenizer, texts, max_length):
    """texts -> input ids [N, max_length], padded and truncated."""
    return tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def build_vae(image_size=32, channels=(16, 32, 64), latent_channels=8):
    """AutoencoderKL with len(channels) - 1 downsamplings and no mid-block attention."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=8, sample_size=image_size,
        mid_block_add_attention=False)  # flat shapes need no global attention; a third faster
    # Start the posterior narrow (std ~0.02, not 1): with SD's tiny KL weight the std shrinks only
    # slowly, and a brief run would otherwise train a decoder that blurs everything.
    with torch.no_grad():
        vae.quant_conv.bias[latent_channels:] = -8.0
    return vae


def build_unet(latent_channels, latent_size, channels=(64, 128, 128), attention=(0, 1, 1),
               layers_per_block=1, attention_head_dim=8, text_width=64, text_time_embedding=True):
    """UNet2DConditionModel over [B, latent_channels, latent_size, latent_size]; attention[i] says
    whether level i has cross-attention blocks."""
    from diffusers import UNet2DConditionModel
    if len(channels) != len(attention):
        raise BadInput(f"the UNet has {len(channels)} levels of channels {tuple(channels)} but "
                       f"{len(attention)} attention flags {tuple(attention)}; give one 0/1 per level")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(channels), down_block_types=down, up_block_types=up,
        layers_per_block=layers_per_block, norm_num_groups=min(32, channels[0]),
        cross_attention_dim=text_width, attention_head_dim=attention_head_dim,
        use_linear_projection=True,
        # Global conditioning reaches every block from the start (as in DeepFloyd IF); cross-
        # attention alone learned place but not colour or shape within a CPU budget. It reads
        # only encoder_hidden_states, so every SD code path drives it unchanged.
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=4,
                resnet_time_scale_shift="scale_shift") if text_time_embedding else {}))


def build_text_encoder(tokenizer, width=64, layers=2, max_length=16):
    """CLIPTextModel for the tokenizer's ids: [B, max_length] -> [B, max_length, width]."""
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_length,
        hidden_act="gelu", pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))


def build_scheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", zero_terminal_snr=True):
    from diffusers import DDPMScheduler
    # SD's scaled_linear betas; with zero terminal SNR the last step holds no trace of the image,
    # as at sampling time: otherwise the model learns to read the layout from the ~7% of signal
    # left at t=T and places objects at random from pure noise. Epsilon cannot predict at zero
    # SNR (x0 = (x - sqrt(1-a) eps) / sqrt(a) with a = 0), hence v-prediction, and zero terminal
    # SNR is ignored with epsilon. "trailing" spacing makes DDIM start at t=999 rather than 951.
    linear = beta_schedule == "linear"
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                         beta_start=0.0001 if linear else 0.00085, beta_end=0.02 if linear else 0.012,
                         prediction_type=prediction_type, clip_sample=False, steps_offset=1,
                         timestep_spacing="trailing",
                         rescale_betas_zero_snr=bool(zero_terminal_snr) and prediction_type == "v_prediction")


class LatentTower(nn.Module):
    """The image side of the text encoder's contrastive pre-training, on VAE latents [B,C,h,w] ->
    [B,E]. Flattened, not pooled: where an object is belongs in the embedding (captions say "on
    the left")."""

    def __init__(self, channels, size, dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1), nn.GELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(), nn.Linear(128 * ((size + 1) // 2) ** 2, dim))

    def forward(self, x):
        return self.net(x)
