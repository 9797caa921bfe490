"""E: image -> caption embedding z [B, L, D], the VLV vision encoder.

The paper uses Florence-2 with 77 learnable queries and an MLP phi; following the seed README we
use a torchvision backbone (ResNet-50 for real runs, a small CNN for the toy world) and the same
idea on top: L learned queries cross-attend to the backbone's spatial features, then the MLP phi
maps them to the text-embedding width D and a LayerNorm fixes their scale.
"""
import math
import os

import torch
import torch.nn as nn
import torchvision

from errors import BadInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def toy_backbone():
    """A small CNN for 32 px toy images: [B,3,32,32] -> [B,128,8,8]. GroupNorm, not BatchNorm,
    so several processes need no synchronised statistics."""
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]
    layers = block(3, 32, 1) + block(32, 64, 2) + block(64, 64, 1) + block(64, 128, 2) + block(128, 128, 1)
    return nn.Sequential(*layers), 128


def resnet_backbone(name, weights):
    """torchvision ResNet without its pooling and classifier: [B,3,H,W] -> [B,C,H/32,W/32].

    weights: "imagenet" (torchvision's file, which must already be in the torch hub cache: this
    code never downloads), "none", or a path to a state dict (.pt / .pth / .safetensors).
    """
    net = getattr(torchvision.models, name)(weights=None)
    if weights == "imagenet":
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.isfile(path):
            raise BadInput(
                f"ImageNet weights for {name} are not on disk at {path}; copy them there "
                f"(from {url}), or pass --backbone_weights PATH or --backbone_weights none")
        weights = path
    if weights != "none":
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    dim = net.fc.in_features
    return nn.Sequential(*list(net.children())[:-2]), dim


def sincos_2d(h, w, dim, device):
    """Fixed 2D sine-cosine positions [h*w, dim]: works at any image size, and tells the queries
    where a feature is (the toy captions say left/right/top/bottom)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    pos = torch.cat(parts, dim=1)
    return nn.functional.pad(pos, (0, dim - pos.shape[1]))


class VisionToTextEmb(nn.Module):
    """image [B,3,H,W] in [0,1] -> z [B, seq_len, embed_dim]."""

    def __init__(self, seq_len, embed_dim, backbone="resnet50", backbone_weights="none",
                 width=None, num_layers=2, num_heads=8):
        super().__init__()
        # Kept so a checkpoint can rebuild the encoder without the flags of the run that made it.
        self.config = dict(seq_len=seq_len, embed_dim=embed_dim, backbone=backbone,
                           width=width, num_layers=num_layers, num_heads=num_heads)
        width = width or embed_dim
        if backbone == "toy":
            self.backbone, feat_dim = toy_backbone()
        else:
            self.backbone, feat_dim = resnet_backbone(backbone, backbone_weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.input_proj = nn.Linear(feat_dim, width)
        # One learned query per output position: they are the positional embeddings of z.
        self.queries = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        layer = nn.TransformerDecoderLayer(width, num_heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.phi = nn.Sequential(nn.Linear(width, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)

    @classmethod
    def from_config(cls, config):
        # Weights come from the checkpoint, so the backbone starts empty.
        return cls(**config, backbone_weights="none")

    def forward(self, images):
        feats = self.backbone((images - self.mean) / self.std)  # [B,C,h,w]
        b, _, h, w = feats.shape
        tokens = self.input_proj(feats.flatten(2).transpose(1, 2))  # [B,h*w,W]
        tokens = tokens + sincos_2d(h, w, tokens.shape[-1], tokens.device).to(tokens.dtype)
        queries = self.queries.unsqueeze(0).expand(b, -1, -1)  # [B,L,W]
        return self.norm(self.phi(self.decoder(queries, tokens)))  # [B,L,D]
