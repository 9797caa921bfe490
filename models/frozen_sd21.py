"""Frozen Stable Diffusion (2.1 or any diffusers SD folder): the teacher that z is distilled into.

Stage 1 trains only the vision encoder E; every part here is frozen, but gradients flow through
the UNet (and, in "text_encoder" mode, the CLIP text encoder) back to z.

    image [0,1] --VAE--> latents --noise(t)--> UNet(noisy, t, cond(z)) --MSE--> target
    cond(z): "direct"       z itself as the cross-attention context
             "text_encoder" z as input embeddings of the frozen CLIP text encoder (the paper)
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import AutoTokenizer, CLIPTextModel
from transformers.masking_utils import create_causal_mask

from errors import BadInput

COND_MODES = ("direct", "text_encoder")
SD_PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


def diffusion_target(scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict, from the scheduler's prediction_type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)  # sqrt(a_t) noise - sqrt(1-a_t) x0
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _load_error(name_or_path, what):
    return BadInput(
        f"{name_or_path}: {what}; pass a local diffusers Stable Diffusion folder "
        f"({'/ '.join(SD_PARTS)}/) or a hub id such as "
        f"stabilityai/stable-diffusion-2-1-base that is in the HF cache (HF_HUB_CACHE) "
        f"when HF_HUB_OFFLINE=1")


def _first_line(e):
    # One line, and without diffusers' "see the stacktrace above": the user gets no stacktrace.
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: " + line.replace(" Please check out the root cause in the stacktrace above.", "")


def _looks_like_path(name):
    # A hub id is "org/name" (or "name"); anything else that does not exist is a missing folder.
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


class FrozenSD(nn.Module):
    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler_config, cond_mode="text_encoder"):
        super().__init__()
        if cond_mode not in COND_MODES:
            raise BadInput(f"cond_mode {cond_mode!r}: unknown; use one of {', '.join(COND_MODES)}")
        self.vae, self.unet, self.text_encoder, self.tokenizer = vae, unet, text_encoder, tokenizer
        self.cond_mode = cond_mode
        # Training noise from the pipeline's own schedule (betas, T, prediction type), whatever
        # scheduler class the folder saved (PNDM for 2.1-base, DDIM for 2.1-768).
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps

        self.seq_len = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
        self.embed_dim = text_encoder.config.hidden_size
        if self.embed_dim != unet.config.cross_attention_dim:
            raise BadInput(f"text encoder width {self.embed_dim} != UNet cross_attention_dim "
                           f"{unet.config.cross_attention_dim}")
        if tokenizer.pad_token is None:
            raise BadInput("the tokenizer has no pad token; captions are padded to max_length")

        self.requires_grad_(False)
        self.train(False)
        # The unconditional branch of classifier-free guidance: the empty caption [1,L,D].
        # A buffer, so it follows .to(device/dtype); not saved (derived from the weights).
        self.register_buffer("uncond", self.embed_text([""]), persistent=False)

        # Sampling: DDIM on the same schedule, through diffusers' own pipeline (built once; it
        # shares these modules, so .to() on the wrapper moves it too). clip_sample=False and
        # steps_offset=1 are what the SD pipeline forces anyway (with a deprecation warning when
        # a config says otherwise); latents are not in [-1,1], so clipping x0 would be wrong.
        sampler = DDIMScheduler.from_config(scheduler_config, clip_sample=False, steps_offset=1)
        self._pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sampler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self._pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, name_or_path, cond_mode="text_encoder", dtype=torch.float32):
        """name_or_path: a local diffusers SD folder or a hub id (downloaded, or read from the HF
        cache when HF_HUB_OFFLINE=1). dtype casts the frozen weights (fp16/bf16 for mixed precision)."""
        if cond_mode not in COND_MODES:
            raise BadInput(f"cond_mode {cond_mode!r}: unknown; use one of {', '.join(COND_MODES)}")
        name_or_path = str(name_or_path)
        folder = name_or_path
        if not os.path.isdir(name_or_path):
            if os.path.exists(name_or_path) or _looks_like_path(name_or_path):
                raise _load_error(name_or_path, "no such folder")
            # A hub id: resolve it to one local snapshot (downloaded, or the HF cache offline), then
            # load every part from that folder. Loading parts by hub id + subfolder fails offline in
            # transformers 5.23: AutoTokenizer looks for tokenizer/config.json, which SD repos lack.
            try:
                folder = DiffusionPipeline.download(name_or_path, trust_remote_code=False,
                                                    safety_checker=None, feature_extractor=None,
                                                    image_encoder=None)
            except Exception as e:  # not on the hub / offline and not cached / no network
                raise _load_error(name_or_path, f"cannot get it ({_first_line(e)})") from None
        missing = [p + "/" for p in SD_PARTS if not os.path.isdir(os.path.join(folder, p))]
        if missing:
            raise _load_error(name_or_path, f"not a Stable Diffusion folder (no {' '.join(missing)})")
        try:
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
            tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), trust_remote_code=False)
            scheduler_config = DDPMScheduler.load_config(folder, subfolder="scheduler")
        except (OSError, ValueError) as e:  # missing weights, broken config
            raise _load_error(name_or_path, f"cannot load ({_first_line(e)})") from None
        try:
            sd = cls(vae, unet, text_encoder, tokenizer, scheduler_config, cond_mode=cond_mode)
        except BadInput as e:
            raise _load_error(name_or_path, str(e)) from None
        return sd.to(dtype=dtype)

    def train(self, mode=True):
        # Frozen teacher: stays in eval (no dropout) whatever the training loop asks.
        return super().train(False)

    # ---- VAE --------------------------------------------------------------------------------

    @torch.no_grad()  # images never need gradients here; saves the encoder's activations
    def latent_dist(self, images):
        """images [B,3,H,W] in [0,1] -> unscaled VAE posterior (mean, std), each [B,C,H/f,W/f]."""
        pixels = (2 * images - 1).to(self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(self, mean, std):
        """A posterior sample in the UNet's latent space (VAE scaling and shift; global RNG)."""
        # randn of the shape, not randn_like: the VAE's outputs come in other memory layouts
        # (strided views, channels-last), and randn_like draws differently per layout, so a cached
        # (contiguous) latent would not draw what a fresh one draws.
        sample = mean + std * torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (sample - shift) * self.vae.config.scaling_factor

    def encode_images(self, images):
        return self.sample_latents(*self.latent_dist(images))

    def decode_latents(self, latents):
        """latents [B,C,h,w] (scaled) -> images [B,3,H,W] in [0,1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        images = self.vae.decode(latents).sample
        return (images / 2 + 0.5).clamp(0, 1)

    # ---- conditioning -----------------------------------------------------------------------

    def condition(self, z):
        """z [B,L,D] -> cross-attention context [B,L,D]. Differentiable w.r.t. z."""
        if self.cond_mode == "direct":
            return z.to(self.unet.dtype)
        # CLIPTextModel.forward (transformers 5) takes only input_ids, so run its own parts on
        # inputs_embeds=z, in its order: + positions, causal-masked encoder, final layer norm.
        te = self.text_encoder
        hidden = te.embeddings(inputs_embeds=z.to(te.dtype))  # [B,L,D]
        mask = create_causal_mask(config=te.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=None)
        hidden = te.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return te.final_layer_norm(hidden).to(self.unet.dtype)

    @torch.no_grad()
    def embed_text(self, captions):
        """captions: list[str] -> CLIP text encoder last_hidden_state [B,L,D] (padded to L)."""
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.seq_len,
                                truncation=True, return_tensors="pt")
        input_ids = tokens.input_ids.to(self.text_encoder.device)
        return self.text_encoder(input_ids).last_hidden_state

    # ---- training ---------------------------------------------------------------------------

    def loss(self, latents, z):
        """Denoising MSE of the frozen UNet conditioned on cond(z); uniform t; global RNG."""
        # fp32 noising and target whatever the weight dtype; one memory layout, so the UNet rounds
        # cached and fresh latents alike.
        latents = latents.float().contiguous()
        noise = torch.randn(latents.shape, dtype=latents.dtype, device=latents.device)  # see sample_latents
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        pred = self.unet(noisy.to(self.unet.dtype), timesteps, encoder_hidden_states=self.condition(z)).sample
        return F.mse_loss(pred.float(), target.float())

    # ---- sampling ---------------------------------------------------------------------------

    @property
    def latent_shape(self):
        """[C,h,w] of the initial noise the sampler starts from (the pipeline's default size)."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def generate(self, cond, num_inference_steps=50, guidance_scale=2.0, seed=0, latents=None):
        """cond [B,L,D] (condition(z) or embed_text(captions)) -> images [B,3,H,W] in [0,1].
        DDIM (eta 0: deterministic given its start) with classifier-free guidance against the
        empty caption. The start is drawn from `seed` for the whole batch, or given as latents
        [B,*latent_shape] (the generator draws each image's own from its seed)."""
        cond = cond.to(device=self.uncond.device, dtype=self.unet.dtype)
        uncond = self.uncond.to(self.unet.dtype).expand(cond.shape[0], -1, -1)
        if latents is not None:
            latents = latents.to(device=cond.device, dtype=self.unet.dtype)
        # output_type="latent" and our own decode: the pipeline's decode ignores the VAE's
        # shift_factor, and this keeps one decode path for the whole codebase.
        latents = self._pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             generator=None if latents is not None else torch.Generator().manual_seed(seed),
                             output_type="latent", return_dict=False)[0]
        return self.decode_latents(latents).float()
