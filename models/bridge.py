"""The diffusion bridge (Lee et al., CVPR 2025): a 1D-UNet DDPM trained on text embeddings only,
which at inference takes a visual embedding as a noisy text embedding and denoises it.

Both modalities go through the paper's chain with their own mean of L2-normalised training vectors:
    centre(x) = scale * normalize(normalize(x) - mean),   scale 5
The DDPM (objective pred_x0, cosine schedule, 1,000 steps) sees x_t renormalised to norm `scale`
before every UNet call, in training and in sampling. The bridge: the centred visual embedding is
taken as x_t at t0 - 1 (no noise added) and `steps` deterministic DDIM steps on the grid
linspace(-1, t0 - 1, steps + 1) reach x0 (t0 = 600, 5 steps: 599, 479, 359, 239, 119); the output
is normalize(x0), in the text side's centred space.

How an embedding [L, D] (L tokens of width D) meets Unet1D, whose input is (batch, channels, length):
  sequence  the whole embedding is one vector: channels = L, length = D (the tokens are channels,
            the convolutions run along the width); normalised as one L*D vector. The default.
  token     each token is a vector alone, as the paper's CLIP vectors: (B*L, 1, D); normalised per
            token. The UNet does not know a token's position.
benchmarks/zero_shot.py measures one against the other (docs/measurements.md). The means are per
position, [L, D], in both layouts.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUTS = ("sequence", "token")
LOSS_WEIGHTS = ("snr", "none")


def default_config(seq_len, dim, **overrides):
    """The paper's recipe for [seq_len, dim] embeddings. unet_dim 32 with mults 1,2,4,8 gives the
    widths 32/64/128/256 of the paper's vendored Unet1D (upstream's `dim` sets the widths; the
    paper's copy passed dim=512 and used init_dim for them)."""
    config = dict(seq_len=seq_len, dim=dim, layout="sequence", scale=5.0, unet_dim=32, dim_mults=[1, 2, 4, 8],
                  num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", loss_weight="snr")
    config.update(overrides)
    return config


def normalize(x, layout):
    """x [B,L,D] -> unit vectors of the layout (the whole [L,D], or each token)."""
    if layout == "token":
        return F.normalize(x, dim=-1)
    return F.normalize(x.flatten(1), dim=1).view_as(x)


def centre(x, mean, scale, layout):
    """The paper's chain: raw embeddings x [B,L,D] -> scale * normalize(normalize(x) - mean)."""
    return scale * normalize(normalize(x.float(), layout) - mean, layout)


def modality_mean(x, layout):
    """The mean of the L2-normalised vectors x [N,L,D] -> [L,D] (not renormalised, as the paper)."""
    return normalize(x.float(), layout).mean(0)


def bridge_timesteps(t0, steps):
    """The paper's grid: linspace(-1, t0 - 1, steps + 1), truncated, from the top; -1 ends at x0."""
    grid = torch.linspace(-1, t0 - 1, steps + 1).int().tolist()
    return list(reversed(grid))


class Bridge(nn.Module):
    """The DDPM over centred embeddings and the bridge sampler. Buffers: text_mean and
    visual_mean [L,D], the schedule's alphas_cumprod [T]."""

    def __init__(self, config, text_mean=None, visual_mean=None):
        super().__init__()
        from denoising_diffusion_pytorch import Unet1D
        from diffusers import DDPMScheduler
        self.config = dict(config)
        L, D = config["seq_len"], config["dim"]
        if config["layout"] not in LAYOUTS:
            raise ValueError(f"unknown layout {config['layout']!r}; one of {', '.join(LAYOUTS)}")
        self.layout, self.scale = config["layout"], config["scale"]
        channels = L if self.layout == "sequence" else 1
        self.unet = Unet1D(dim=config["unet_dim"], dim_mults=tuple(config["dim_mults"]), channels=channels)
        # Training noises with diffusers' DDPM schedule; the sampler reads its alphas_cumprod.
        self.scheduler = DDPMScheduler(num_train_timesteps=config["num_train_timesteps"],
                                       beta_schedule=config["beta_schedule"], prediction_type="sample",
                                       clip_sample=False)
        alphas_cumprod = self.scheduler.alphas_cumprod.float()
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        snr = alphas_cumprod / (1 - alphas_cumprod)  # pred_x0 weighted by SNR: the paper's (lucidrains') loss
        self.register_buffer("loss_weight", snr if config["loss_weight"] == "snr" else torch.ones_like(snr))
        self.register_buffer("text_mean", torch.zeros(L, D) if text_mean is None else text_mean.float())
        self.register_buffer("visual_mean", torch.zeros(L, D) if visual_mean is None else visual_mean.float())

    @classmethod
    def from_config(cls, config):
        return cls(config["bridge"])

    # -- the normalisation chain -------------------------------------------------------------
    def centre(self, x, side):
        """Raw embeddings [B,L,D] of side "text" or "visual" -> scale * normalize(normalize(x) - mean)."""
        return centre(x, self.text_mean if side == "text" else self.visual_mean, self.scale, self.layout)

    def rescale(self, x):
        return self.scale * normalize(x, self.layout)

    # -- the UNet's view ---------------------------------------------------------------------
    def denoiser(self, x, t):
        """The predicted x0 [B,L,D] of x_t [B,L,D] (already at norm scale) at integer timesteps t [B]."""
        B, L, D = x.shape
        if self.layout == "token":  # (B*L, 1, D); each token's timestep is its embedding's
            out = self.unet(x.reshape(B * L, 1, D), t.repeat_interleave(L).float())
            return out.view(B, L, D)
        return self.unet(x, t.float())  # (B, L, D): L channels of length D

    def forward(self, x0, t=None, noise=None):
        """The training loss on centred text embeddings x0 [B,L,D] (norm scale): MSE of the
        predicted x0 from the renormalised x_t, weighted per timestep."""
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, len(self.alphas_cumprod), (B,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.rescale(self.scheduler.add_noise(x0, noise, t))
        loss = (self.denoiser(xt, t) - x0).pow(2).flatten(1).mean(1)
        return (loss * self.loss_weight[t]).mean()

    @torch.no_grad()
    def denoise(self, x, t0=600, steps=5, unit=True):
        """Centred x [B,L,D], taken as x_{t0-1}, -> normalize(x0) after `steps` UNet calls
        (unit=False: x0 itself).

        diffusers' DDIMScheduler derives each step's predecessor as t - T // num_inference_steps,
        so it cannot take the paper's grid (steps of 120 from t0 = 600); the deterministic DDIM
        update (eta = 0, x0 unclipped) is written out here on diffusers' schedule."""
        times = bridge_timesteps(t0, steps)
        x = x.float()
        for t, t_next in zip(times[:-1], times[1:]):
            x = self.rescale(x)
            x0 = self.denoiser(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
            if t_next < 0:
                x = x0
                break
            a, a_next = self.alphas_cumprod[t], self.alphas_cumprod[t_next]
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return normalize(x, self.layout) if unit else x

    def bridge(self, visual, t0=600, steps=5):
        """Raw visual embeddings [B,L,D] -> the text side's centred space, unit norm. steps 0: the
        mean shift alone (C3: each side centred by its own mean), no UNet call."""
        x = self.centre(visual, "visual")
        return normalize(x, self.layout) if steps == 0 else self.denoise(x, t0, steps)

    def augment(self, text, t0=400, steps=5, generator=None):
        """The paper's decoder-training augmentation: centred text [B,L,D] noised to t0 - 1 and
        denoised by the bridge -> unit norm, centred. generator: a CPU torch.Generator for the noise
        (drawn on the CPU, so a GPU and a CPU augment alike)."""
        t = torch.full((text.shape[0],), t0 - 1, device=text.device, dtype=torch.long)
        noise = torch.randn(text.shape, generator=generator).to(text.device)
        return self.denoise(self.scheduler.add_noise(text.float(), noise, t), t0, steps)
