"""Feature enhancers: z -> z' between the vision encoder and the captioner, behind one interface.

An enhancer is a module `enhancer(x, images) -> x'` that works in one space: "z" (the encoder's
output, before cond) or "cond" (cond(z), what the captioner reads with prefix_source "cond").
VLV.embed applies it in its space. (common.load_enhancer builds one from --enhancer.)
"""
import torch
import torch.nn as nn


class FlowEnhancer(nn.Module):
    """A trained flow (models.flow.Flow) taking x as x_{t0} to t = 1 in `steps` ODE steps."""

    def __init__(self, flow, space, t0=0.0, steps=8, method="euler"):
        super().__init__()
        self.flow, self.space, self.t0, self.steps, self.method = flow, space, t0, steps, method

    def forward(self, x, images=None):
        return self.flow.transport(x, self.t0, self.steps, self.method).to(x.dtype)


class LinearEnhancer(nn.Module):
    """The closed-form ridge map (models.flow.RidgeMap) fitted on the flow's own pairs."""

    def __init__(self, ridge, space):
        super().__init__()
        self.ridge, self.space = ridge, space

    @torch.no_grad()
    def forward(self, x, images=None):
        return self.ridge(x).to(x.dtype)


class BridgeEnhancer(nn.Module):
    """A trained diffusion bridge (models.bridge.Bridge): cond(z) -> the text side's centred space,
    at the norm the text-only captioner was trained on (the bridge's scale)."""

    space = "cond"

    def __init__(self, bridge, t0=600, steps=5):
        super().__init__()
        self.bridge, self.t0, self.steps = bridge, t0, steps

    @torch.no_grad()
    def forward(self, x, images=None):
        return (self.bridge.scale * self.bridge.bridge(x, self.t0, self.steps)).to(x.dtype)


class SDRefine(nn.Module):
    """No training: `steps` Adam steps on z that lower the frozen teacher's denoising loss on the
    image's own latents (the seed's enhance_features_diffusion.py). Each step draws its noise and
    timesteps from a generator seeded with (seed, step), so the same images give the same z'.
    The loss is a batch mean; Adam's steps do not depend on that scale, so each z moves as it
    would alone (apart from the noise it is drawn)."""

    space = "z"

    def __init__(self, sd, steps=10, lr=0.05, seed=0):
        super().__init__()
        self.sd, self.steps, self.lr, self.seed = sd, steps, lr, seed

    def forward(self, z, images):
        if images is None:
            raise ValueError("sd_refine needs the images whose latents it denoises")
        with torch.random.fork_rng(devices=[z.device] if z.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            latents = self.sd.encode_images(images)
            with torch.enable_grad():
                z = z.detach().float().clone().requires_grad_(True)
                optimizer = torch.optim.Adam([z], lr=self.lr)
                for k in range(self.steps):
                    torch.manual_seed(self.seed + 1 + k)
                    loss = self.sd.loss(latents, z)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        return z.detach()
