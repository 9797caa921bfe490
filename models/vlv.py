"""The assembled auto-encoder: image -E-> z -D-> caption, and z or caption -SD-> image.

Also the two loaders every script and benchmark shares: load_stage1 (encoder + frozen SD from a
vision_encoder_{step}.pt) and load_vlv (the whole auto-encoder from its two checkpoints).
"""
import torch
import torch.nn as nn

import common
from models.emb_to_caption import EmbToCaption
from models.frozen_sd21 import FrozenSD
from models.vision_to_textemb import VisionToTextEmb


class VLV(nn.Module):
    """encoder: VisionToTextEmb; sd: FrozenSD; captioner: EmbToCaption.

    prefix_source says what the captioner reads: "cond" = cond(z), the SD text-encoder output
    (the paper's choice: psi is applied to the text-encoder output), or "z" itself.
    """

    def __init__(self, encoder, sd, captioner, prefix_source="cond", image_size=384):
        super().__init__()
        self.encoder, self.sd, self.captioner = encoder, sd, captioner
        self.prefix_source, self.image_size = prefix_source, image_size

    def prefix(self, images):
        """images [B,3,S,S] in [0,1] -> the captioner's input [B,L,D]."""
        z = self.encoder(images)
        return self.sd.condition(z) if self.prefix_source == "cond" else z

    def forward(self, images, captions, groups=None, pick="best"):
        """The stage-2 loss. captions: one per image, or, with groups (LongTensor, caption i belongs
        to images[groups[i]]), all the references of each image, of which the captioner's loss
        keeps one, the best or a posterior sample (pick: EmbToCaption.forward). A frozen encoder
        runs without a graph."""
        encoder_trains = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            prefix = self.prefix(images)
        return self.captioner(prefix, captions, groups, pick)

    @torch.no_grad()
    def caption(self, images, **generate_kwargs):
        return self.captioner.generate(self.prefix(images), **generate_kwargs)

    @torch.no_grad()
    def regenerate(self, images=None, captions=None, num_inference_steps=50, guidance_scale=2.0, seed=0):
        """From captions (caption -> SD text encoder -> SD) or, when captions is None, straight
        from z (z -> cond -> SD). Returns [B,3,H,W] in [0,1] at the SD resolution."""
        cond = self.sd.embed_text(captions) if captions is not None else self.sd.condition(self.encoder(images))
        return self.sd.generate(cond, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, seed=seed)


def load_stage1(path, device, dtype=torch.float32):
    """The stage-1 encoder and its frozen SD from a vision_encoder_{step}.pt checkpoint.
    Returns (encoder, sd, stage-1 config, fingerprint of the encoder weights)."""
    ckpt = common.load_checkpoint(path, "stage1")
    config = ckpt["config"]
    encoder = VisionToTextEmb.from_config(config["encoder"])
    encoder.load_state_dict(ckpt["model"])
    sd = FrozenSD.from_pretrained(config["sd_model_id"], cond_mode=config["cond_mode"], dtype=dtype)
    return encoder.to(device), sd.to(device), config, common.fingerprint(ckpt["model"])


def load_vlv(stage1_ckpt, stage2_ckpt, device="cpu"):
    """The auto-encoder from its two checkpoints; refuses a pair that was not trained together."""
    ckpt = common.load_checkpoint(stage2_ckpt, "stage2")
    config = ckpt["config"]
    encoder, sd, _, fingerprint = load_stage1(stage1_ckpt, device)
    if "encoder" in ckpt["model"]:  # stage 2 fine-tuned the encoder: its weights win
        encoder.load_state_dict(ckpt["model"]["encoder"])
    elif fingerprint != config["stage1_fingerprint"]:
        common.die(f"{stage2_ckpt} was trained on the stage-1 weights of {config['stage1_ckpt']}, "
                   f"not on those in {stage1_ckpt}; pass the stage-1 checkpoint it was trained with")
    captioner = EmbToCaption.from_pretrained(**config["captioner"])
    captioner.load_trainable_state_dict(ckpt["model"]["captioner"])
    vlv = VLV(encoder, sd, captioner, config["prefix_source"], config["image_size"])
    return vlv.to(device).eval()
