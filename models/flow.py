"""Flow matching on the caption embedding z: the velocity network, the straight path, the ODE,
and the closed-form linear baselines every flow is measured against.

A flow carries x0 (a corrupted z, cond(z), or noise) to x1 (the clean z, T(caption), or a z) along
x_t = (1 - t) x0 + t x1, learning the velocity x1 - x0 (rectified flow / conditional OT).
Both ends are standardised per element ([L, D] means and stds of the training data, saved as
buffers), so one recipe fits z, cond(z) and text embeddings of any scale.

The path and the solvers are written here rather than taken from facebookresearch/flow_matching:
that package is CC BY-NC (non-commercial), and what this needs of it is the ten lines of
`path_sample` and `integrate`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SOLVERS = ("euler", "midpoint", "heun")


def path_sample(x0, x1, t):
    """The straight path at times t [B]: (x_t, target velocity x1 - x0), both like x0."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * x1, x1 - x0


def integrate(velocity, x, t0=0.0, t1=1.0, steps=8, method="euler"):
    """Solve dx/dt = velocity(x, t) from t0 to t1 in `steps` equal steps. velocity(x, t [B]) -> dx.
    euler: one call a step; midpoint and heun (the explicit trapezoid): two."""
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE solver {method!r}; choose from {', '.join(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"ODE steps must be at least 1, not {steps}")
    h = (t1 - t0) / steps
    time = lambda s: torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)  # noqa: E731
    for k in range(steps):
        t = t0 + k * h
        v = velocity(x, time(t))
        if method == "euler":
            x = x + h * v
        elif method == "midpoint":
            x = x + h * velocity(x + 0.5 * h * v, time(t + 0.5 * h))
        else:
            x = x + 0.5 * h * (v + velocity(x + h * v, time(t + h)))
    return x


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as DiT's integer timesteps) -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """A DiT block: self-attention and MLP, each behind a LayerNorm whose shift, scale and
    residual gate come from the time embedding (adaLN-Zero: the gates start at 0, so the block
    starts as the identity)."""

    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c, attn_mask=None):
        """x [B,L,W], c [B,W], attn_mask [B,1,1,L] (True = attend) or None."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        B, L, W = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(B, L, 3, self.heads, -1).unbind(2)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask)           # [B,heads,L,W/heads]
        x = x + gate1[:, None] * self.out(h.transpose(1, 2).reshape(B, L, W))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class VelocityNet(nn.Module):
    """v(x_t, t) over the L tokens of z [B, L, dim]: a small DiT-style transformer with learned
    positions. At a width other than dim, a linear projection in and one out (the seed's
    5120 -> 768 -> 5120). The output layer starts at zero: an untrained flow moves nothing."""

    def __init__(self, seq_len, dim, width=None, depth=4, heads=4, mlp_ratio=4.0):
        super().__init__()
        width = width or dim
        if width % heads:
            raise ValueError(f"flow width {width} is not divisible by its {heads} heads")
        self.config = dict(seq_len=seq_len, dim=dim, width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
        self.proj_in = nn.Linear(dim, width) if width != dim else nn.Identity()
        self.pos = nn.Parameter(torch.randn(1, seq_len, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, width)
        self.proj_out = nn.Linear(width, dim) if width != dim else nn.Identity()
        for layer in (self.final_ada[1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if width != dim:
            nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, t, key_padding_mask=None):
        """x [B,L,dim], t [B] in [0,1], key_padding_mask [B,L] (True = a padding token no token
        attends to) -> velocity [B,L,dim]."""
        h = self.proj_in(x) + self.pos
        c = self.time(timestep_embedding(t, h.shape[-1]).to(h.dtype))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        for block in self.blocks:
            h = block(h, c, mask)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.proj_out(self.final(modulate(self.norm(h), shift, scale)))


class Flow(nn.Module):
    """A velocity network between two standardised ends. `source_*` / `target_*` are the [L, D]
    per-element means and stds of x0 and x1 (the prior's source is N(0, I): mean 0, std 1)."""

    def __init__(self, net_config, source_mean, source_std, target_mean, target_std):
        super().__init__()
        self.net = VelocityNet(**net_config)
        for name, value in (("source_mean", source_mean), ("source_std", source_std),
                            ("target_mean", target_mean), ("target_std", target_std)):
            self.register_buffer(name, value.float().clone())

    @classmethod
    def from_config(cls, config):
        """Shapes only (the statistics come with the state dict)."""
        shape = (config["net"]["seq_len"], config["net"]["dim"])
        zeros, ones = torch.zeros(shape), torch.ones(shape)
        return cls(config["net"], zeros, ones, zeros, ones)

    def to_source(self, x):
        return (x - self.source_mean) / self.source_std

    def to_target(self, x):
        return (x - self.target_mean) / self.target_std

    def from_target(self, x):
        return x * self.target_std + self.target_mean

    def forward(self, x0, x1, t, key_padding_mask=None, endpoint_steps=0):
        """Standardised ends [B,L,D], times [B] -> the flow-matching loss (mean squared error of
        the velocity, over the tokens that are not padding). endpoint_steps > 0: also x0 carried
        to t = 1 in that many Euler steps, with its graph (standardised target units [B,L,D]), for
        a loss on what the flow hands its reader: -> (loss, end point). In this one forward call,
        so that DDP syncs the gradients of both."""
        velocity = lambda x, s: self.net(x, s, key_padding_mask)  # noqa: E731
        xt, target = path_sample(x0, x1, t)
        err = (velocity(xt, t) - target).pow(2).mean(-1)                      # [B,L]
        if key_padding_mask is None:
            loss = err.mean()
        else:
            keep = (~key_padding_mask).to(err.dtype)
            loss = (err * keep).sum() / keep.sum().clamp(min=1)
        if not endpoint_steps:
            return loss
        return loss, integrate(velocity, x0, 0.0, 1.0, endpoint_steps)

    @torch.no_grad()
    def transport(self, x, t0=0.0, steps=8, method="euler", key_padding_mask=None):
        """x in the source's own units [B,L,D] (or standard noise for a prior, with t0 = 0) taken
        as x_{t0}, carried to t = 1 -> [B,L,D] in the target's units."""
        x0 = self.to_source(x.float())
        x1 = integrate(lambda x, t: self.net(x, t, key_padding_mask), x0, t0, 1.0, steps, method)
        return self.from_target(x1)


# ---------------------------------------------------------------------------------------------
# Closed-form baselines on the same pairs: what the flow must add to be worth its steps.

class RidgeMap(nn.Module):
    """x1 ~ x0 W + b for each token position on its own: [L, D+1, D] fitted by ridge regression
    in closed form. (Per position rather than over the flattened [L*D]: at the paper's 77 x 1024
    the joint map would be 78,848 square.)"""

    def __init__(self, seq_len, dim):
        super().__init__()
        self.register_buffer("weight", torch.zeros(seq_len, dim + 1, dim))

    @classmethod
    def fit(cls, x0, x1, alpha=1e-3):
        """x0, x1 [N,L,D]; alpha: the ridge penalty relative to the mean of X^T X's diagonal."""
        n, L, D = x0.shape
        x = torch.cat([x0.double(), torch.ones(n, L, 1, dtype=torch.float64)], -1).transpose(0, 1)  # [L,N,D+1]
        y = x1.double().transpose(0, 1)                                                              # [L,N,D]
        xtx = x.transpose(1, 2) @ x                                                                  # [L,D+1,D+1]
        penalty = alpha * xtx.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(D + 1, dtype=torch.float64)
        model = cls(L, D)
        model.weight.copy_(torch.linalg.solve(xtx + penalty, x.transpose(1, 2) @ y).float())
        return model

    def forward(self, x0):
        """x0 [B,L,D] -> [B,L,D]."""
        x = x0.float()
        return torch.einsum("bld,lde->ble", x, self.weight[:, :-1]) + self.weight[:, -1]


class GaussianPrior(nn.Module):
    """The data's mean and covariance over the flattened [L*D]: sample = mean + factor @ g,
    factor [L*D, k] with factor factor^T the covariance (exact when k = min(N, L*D); above
    `max_rank` its top principal directions only)."""

    def __init__(self, seq_len, dim, rank):
        super().__init__()
        self.shape = (seq_len, dim)
        self.register_buffer("mean", torch.zeros(seq_len * dim))
        self.register_buffer("factor", torch.zeros(seq_len * dim, rank))

    @classmethod
    def fit(cls, x, max_rank=1024):
        """x [N,L,D] -> the Gaussian of its rows."""
        n, L, D = x.shape
        flat = x.reshape(n, -1).double()
        mean = flat.mean(0)
        centred = flat - mean
        if min(n, L * D) <= max_rank:
            _, s, vh = torch.linalg.svd(centred, full_matrices=False)
            v = vh.T
        else:
            _, s, v = torch.pca_lowrank(centred, q=max_rank, center=False)
        model = cls(L, D, v.shape[1])
        model.mean.copy_(mean.float())
        model.factor.copy_((v * s / math.sqrt(max(n - 1, 1))).float())
        return model

    @property
    def noise_shape(self):
        return (self.factor.shape[1],)

    def from_noise(self, g):
        """g [B,k] standard normal -> z [B,L,D]."""
        return (self.mean + g.to(self.factor) @ self.factor.T).reshape(len(g), *self.shape)

    def sample(self, n, generator=None):
        return self.from_noise(torch.randn(self.factor.shape[1], n, generator=generator).T)
