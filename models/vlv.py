"""The assembled auto-encoder: image -E-> z -D-> caption, and z or caption -SD-> image.

(common.load_stage1 and common.load_vlv build it from the two stages' checkpoints.)
"""
import torch
import torch.nn as nn


class VLV(nn.Module):
    """encoder: VisionToTextEmb; sd: FrozenSD; captioner: EmbToCaption.

    prefix_source says what the captioner reads: "cond" = cond(z), the SD text-encoder output
    (the paper's choice: psi is applied to the text-encoder output), or "z" itself.
    """

    def __init__(self, encoder, sd, captioner, prefix_source="cond", image_size=384, enhancer=None):
        super().__init__()
        self.encoder, self.sd, self.captioner = encoder, sd, captioner
        self.prefix_source, self.image_size = prefix_source, image_size
        self.enhancer = enhancer  # models.enhancers: applied at inference, in its space ("z" or "cond")
        # A captioner trained on text alone: {"norm": "center" | "none", "layout", "scale", "mean"}
        # (train_stage2.py --text_only); None for one trained on images.
        self.text_space = None

    def embed(self, images):
        """images [B,3,S,S] in [0,1] -> (z, cond(z)) [B,L,D] each, through the enhancer if any."""
        z = self.encoder(images)
        if self.enhancer is not None and self.enhancer.space == "z":
            z = self.enhancer(z, images)
        cond = self.sd.condition(z)
        if self.enhancer is not None and self.enhancer.space == "cond":
            cond = self.enhancer(cond, images)
        return z, cond

    def prefix(self, images):
        """images [B,3,S,S] in [0,1] -> the captioner's input [B,L,D]."""
        if self.enhancer is None and self.prefix_source == "z":
            return self.encoder(images)
        return self.captioner_input(*self.embed(images))

    def captioner_input(self, z, cond=None):
        """z [B,L,D] (and cond(z), when already computed) -> what the captioner reads."""
        if self.prefix_source != "cond":
            return z
        return self.sd.condition(z) if cond is None else cond

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
    def caption(self, images, **decoding):
        """images [B,3,S,S] in [0,1] -> B captions (decoding: EmbToCaption.generate's settings). An
        EVCap memory with regions retrieves each image's names from its region views here, where the
        images are (their views through the encoder, in the memory's space)."""
        prefix = self.prefix(images)
        memory = self.captioner.memory if self.captioner.kind == "evcap" else None
        if memory is None or not memory.regions:
            return self.captioner.generate(prefix, **decoding)
        names = memory.names_by_regions(images, prefix, lambda views: self.captioner_input(self.encoder(views)))
        return self.captioner.generate(prefix, names=names, **decoding)

    @torch.no_grad()
    def regenerate(self, images=None, captions=None, num_inference_steps=50, guidance_scale=2.0, seed=0):
        """From captions (caption -> SD text encoder -> SD) or, when captions is None, straight
        from z (z -> cond -> SD, through the enhancer if any). Returns [B,3,H,W] in [0,1] at the SD
        resolution."""
        cond = self.sd.embed_text(captions) if captions is not None else self.embed(images)[1]
        return self.sd.generate(cond, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, seed=seed)
