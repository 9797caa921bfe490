"""Activation checkpointing for networks whose library has no switch for it (the flow's transformer
blocks, denoising-diffusion-pytorch's Unet1D): each chosen submodule keeps only its inputs in the
forward pass and runs again in the backward pass. diffusers' models and transformers' have their own
switch (`enable_gradient_checkpointing`, `gradient_checkpointing_enable`); the scripts use those.

The forward of each module instance is wrapped (not the module replaced), so state dicts, parameter
order and EMA are untouched; non-reentrant checkpointing, so inputs may be keyword arguments and
the RNG (dropout) replays as it ran.
"""
import torch.utils.checkpoint


def checkpoint_submodules(model, wanted):
    """Wrap the forward of every submodule m of model with wanted(m) true; returns how many. Only
    while gradients are being recorded: no_grad inference runs as before."""
    count = 0
    for module in model.modules():
        if not wanted(module) or getattr(module, "_checkpointed", False):
            continue
        forward = module.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        module.forward = checkpointed
        module._checkpointed = True
        count += 1
    return count


def enable_library_checkpointing(model):
    """Turn on the own switch of every transformers and diffusers model inside `model` (the outermost
    of nested ones); returns their class names. transformers checkpoints a layer only in train mode,
    diffusers whenever gradients are recorded (so a frozen UNet in eval mode checkpoints too)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel
    enabled = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            if not module.is_gradient_checkpointing:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                enabled.append(type(module).__name__)
        elif isinstance(module, ModelMixin) and module._supports_gradient_checkpointing:
            if not module.is_gradient_checkpointing:
                module.enable_gradient_checkpointing()
                enabled.append(type(module).__name__)
    return enabled
