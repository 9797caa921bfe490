"""Memory and GPU-hour plan of the paper-sized run, per stage, from configs alone (no weights).

    python -m benchmarks.memory_plan --preset sd21 --llm Qwen/Qwen2.5-3B
    python -m benchmarks.memory_plan --llm path/to/any/causal/lm --gpu_gb 80 --gpus 8

Method. Every network is built from its published config on PyTorch's "meta" device (shapes, no
memory, no compute) in bf16, and one training step is run at the paper's shapes (SD 2.1-base at 384
px: 48 x 48 latents, z 77 x 1024, Qwen2.5-3B on 77 prefix + --caption_tokens tokens):
- activations: the bytes autograd saves for the backward pass (torch.autograd.graph.saved_tensors_hooks),
  parameters excluded, at batch 1 and 2 (their difference is the per-sample cost); with
  --gradient_checkpointing only what crosses the checkpoints stays saved. Attention probabilities
  the meta device's math attention saves are left out: on a GPU, flash / memory-efficient attention
  keeps none. Autocast keeps a few norms and softmaxes in fp32, so real activations run somewhat higher.
- weights: trainable parameters cost 16 bytes each (fp32 weight, gradient, AdamW's two moments),
  frozen ones 2 (bf16); FSDP shards what the prepared model holds over --gpus.
- the largest per-GPU batch leaves 15% of the GPU for the CUDA context, the allocator, workspaces
  and the recompute of one checkpointed block: floor((0.85 x GPU - weights) / per-sample activations).
- FLOPs: torch.utils.flop_counter over the same step (forward, backward, and the recompute under
  checkpointing); GPU-hours at --gpu_tflops x --mfu.
No GPU measured these figures unless the README says so; they are estimates.
"""
import argparse
import math
import types

import torch
import torch.nn as nn

import common
import errors

# Published config values (the repos' config.json files), so the plan needs no download.
SD21_BASE = dict(
    unet=dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
              layers_per_block=2, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
              use_linear_projection=True),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
             layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
    text_encoder=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                      projection_dim=512, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77))
QWEN25_3B = dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0)
VLV_STAGE1_GPU_HOURS = 8 * 4 * 24  # the paper: stage 1 on 8 GPUs for about 4 days
META, BF16 = torch.device("meta"), torch.bfloat16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sd21", choices=["sd21"], help="the SD 2.1-base shapes of the paper's run")
    p.add_argument("--llm", default="Qwen/Qwen2.5-3B",
                   help="any causal LM: a local folder or a hub id in the HF cache (its config.json); "
                        "Qwen/Qwen2.5-3B falls back to its published config")
    p.add_argument("--image_size", type=int, default=384)
    p.add_argument("--caption_tokens", type=int, default=64, help="caption tokens after the 77-token prefix")
    p.add_argument("--gpu_gb", type=float, default=80)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu_tflops", type=float, default=989, help="bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="the share of the peak a step reaches")
    return p.parse_args(argv)


def llm_config(name):
    from transformers import AutoConfig, Qwen2Config
    try:  # a local folder, or the HF cache: never the network
        return AutoConfig.from_pretrained(name, local_files_only=True), "its config.json"
    except (OSError, ValueError):
        if name == "Qwen/Qwen2.5-3B":
            return Qwen2Config(**{k: v for k, v in QWEN25_3B.items() if k != "model_type"}), "published values"
        common.die(f"--llm {name}: no config.json to read (a local folder, or a hub id in the HF cache with "
                   f"HF_HUB_OFFLINE=1); the plan needs no weights, only the config")


class SavedBytes:
    """Bytes autograd saves for backward while active, parameters and square attention maps excluded."""

    def __init__(self, params):
        self.params = {id(p) for p in params}
        self.bytes = self.attention = 0

    def pack(self, x):
        base = x._base if x._base is not None else x
        if id(x) in self.params or id(base) in self.params:
            return x
        size = x.numel() * x.element_size()
        if x.dim() >= 3 and x.shape[-1] == x.shape[-2] and x.shape[-1] >= 256:
            self.attention += size  # softmax(QK^T) of the math path
        else:
            self.bytes += size
        return x

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def measure(model, step):
    """step(batch) -> loss on `model`'s meta tensors. Returns (static bytes, bytes per sample, FLOPs per
    sample) of one training step (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    saved, flops = [], []
    for batch in (1, 2):
        with FlopCounterMode(display=False) as counter:
            with SavedBytes(model.parameters()) as s:
                loss = step(batch)
            loss.backward()
        saved.append(s.bytes)
        flops.append(counter.get_total_flops())
    per_sample = saved[1] - saved[0]
    return saved[0] - per_sample, per_sample, flops[1] - flops[0]


def count(module):
    """Parameters of module, a tied one once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


class Stage:
    """One training step of a stage, built from configs on `device`: trainable (what the optimizer
    holds, in trainable_dtype), frozen (modules without gradients, in frozen_dtype), step(batch) -> loss."""

    def __init__(self, trainable, frozen, step, source=None):
        self.trainable, self.frozen, self.step, self.source = trainable, frozen, step, source


def build_stage1(sizes, device, trainable_dtype, frozen_dtype, checkpointing):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.frozen_sd21 import FrozenSD
    from models.vision_to_textemb import VisionToTextEmb
    with torch.device(device):
        unet = UNet2DConditionModel(**sizes["unet"]).to(frozen_dtype)
        vae = AutoencoderKL(**sizes["vae"]).to(frozen_dtype)
        text = CLIPTextModel(CLIPTextConfig(**sizes["text_encoder"])).to(frozen_dtype)
        encoder = VisionToTextEmb(sizes["seq_len"], sizes["dim"], backbone=sizes["backbone"]).to(trainable_dtype)
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    sd = types.SimpleNamespace(cond_mode="text_encoder", text_encoder=text, unet=unet)  # what condition() reads
    size, side = sizes["image_size"], sizes["image_size"] // 8

    def step(batch):
        z = encoder(torch.rand(batch, 3, size, size, device=device, dtype=trainable_dtype))
        cond = FrozenSD.condition(sd, z)
        noisy = torch.randn(batch, 4, side, side, device=device, dtype=frozen_dtype)
        pred = unet(noisy, torch.full((batch,), 500, device=device), encoder_hidden_states=cond).sample
        return pred.float().pow(2).mean()

    return Stage(encoder, [unet, vae, text], step)


def build_stage2(sizes, device, trainable_dtype, frozen_dtype, checkpointing):
    from transformers import AutoModelForCausalLM, CLIPTextConfig, CLIPTextModel

    from models.vision_to_textemb import VisionToTextEmb
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(sizes["llm"], dtype=trainable_dtype)
        hidden = lm.get_input_embeddings().embedding_dim
        d = sizes["dim"]
        psi = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden)).to(trainable_dtype)  # "mlp"
        # frozen at this stage: the stage-1 encoder and SD's text encoder (cond(z)), run without gradients
        frozen = [VisionToTextEmb(sizes["seq_len"], d, backbone=sizes["backbone"]).to(frozen_dtype),
                  CLIPTextModel(CLIPTextConfig(**sizes["text_encoder"])).to(frozen_dtype)]
    lm.tie_weights()
    lm.train()
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    L, tokens = sizes["seq_len"], sizes["caption_tokens"]
    vocab = lm.config.vocab_size

    def step(batch):
        prefix = psi(torch.randn(batch, L, d, device=device, dtype=trainable_dtype))
        ids = torch.randint(0, vocab, (batch, tokens), device=device)
        words = lm.get_input_embeddings()(ids)
        labels = torch.cat([torch.full((batch, L), -100, device=device, dtype=torch.long), ids], 1)
        # A ready 4D causal mask: transformers' own mask building looks at values, which meta tensors lack.
        n = labels.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, 1, n, n)
        return lm(inputs_embeds=torch.cat([prefix, words.to(prefix.dtype)], 1), attention_mask=mask, labels=labels,
                  use_cache=False).loss

    return Stage(nn.ModuleList([lm, psi]), frozen, step, source=sizes.get("llm_source"))


def build_flow(sizes, device, trainable_dtype, frozen_dtype, checkpointing):
    from models.checkpointing import checkpoint_submodules
    from models.flow import Block, Flow
    L, D = sizes["seq_len"], sizes["dim"]
    zero, one = torch.zeros(L, D, device=device), torch.ones(L, D, device=device)
    with torch.device(device):
        flow = Flow(dict(seq_len=L, dim=D, depth=4, heads=4), zero, one, zero, one).to(trainable_dtype)
    if checkpointing:
        checkpoint_submodules(flow.net, lambda m: isinstance(m, Block))

    def step(batch):
        x = torch.randn(batch, L, D, device=device, dtype=trainable_dtype)
        return flow(x, x, torch.rand(batch, device=device))

    return Stage(flow, [], step)


def build_bridge(sizes, device, trainable_dtype, frozen_dtype, checkpointing):
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch_1d import ResnetBlock, Residual

    from models.bridge import Bridge, default_config
    from models.checkpointing import checkpoint_submodules
    L, D = sizes["seq_len"], sizes["dim"]
    with torch.device(device):
        unet = Bridge(default_config(L, D)).unet.to(trainable_dtype)
    if checkpointing:
        checkpoint_submodules(unet, lambda m: isinstance(m, (ResnetBlock, Residual)))

    def step(batch):
        x = torch.randn(batch, L, D, device=device, dtype=trainable_dtype)
        return unet(x, torch.full((batch,), 500.0, device=device)).pow(2).mean()

    return Stage(unet, [], step)


def paper_sizes(args):
    """The shapes of the paper's run: SD 2.1-base, z 77 x 1024, the --llm's config."""
    config, source = llm_config(args.llm)
    return dict(SD21_BASE, llm=config, llm_source=source, image_size=args.image_size, seq_len=77, dim=1024,
                backbone=common.PRESETS[args.preset]["all"]["backbone"], caption_tokens=args.caption_tokens)


def planned(build, sizes, checkpointing, dtype):
    """A stage's parameter counts and measure() on the meta device, every network in dtype (bf16 for
    the big ones, standing for autocast; the flow and the bridge run fp32 ops inside)."""
    stage = build(sizes, META, dtype, dtype, checkpointing)
    whole = nn.ModuleList([stage.trainable, *stage.frozen])
    return dict(trainable=count(stage.trainable), frozen=sum(count(m) for m in stage.frozen), source=stage.source,
                **dict(zip(("static", "per_sample", "flops"), measure(whole, stage.step))))


STAGES = {"stage 1 (E through the frozen SD 2.1-base UNet, 384 px)": (build_stage1, BF16),
          "stage 2 (Qwen2.5-3B fully fine-tuned)": (build_stage2, BF16),
          "flow on z (77 x 1024, width 1024, depth 4)": (build_flow, torch.float32),
          "bridge (Unet1D, the paper's recipe)": (build_bridge, torch.float32)}


def largest_batch(usable, weights, static, per_sample):
    room = usable - weights - static
    return max(0, math.floor(room / per_sample)) if per_sample > 0 else 0


def main(argv=None):
    args = parse_args(argv)
    gib = 2 ** 30
    usable = 0.85 * args.gpu_gb * 1e9
    plan, rows, sizes = {}, [], paper_sizes(args)
    for name, (build, dtype) in STAGES.items():
        if "Qwen" in name:
            name = f"stage 2 ({args.llm} fully fine-tuned)"
        plain, ckpt = planned(build, sizes, False, dtype), planned(build, sizes, True, dtype)
        weights = 16 * plain["trainable"] + 2 * plain["frozen"]
        sharded = 16 * plain["trainable"] / args.gpus + 2 * plain["frozen"]
        batches = {(s, c): largest_batch(usable, w, r["static"], r["per_sample"])
                   for s, w in (("ddp", weights), ("fsdp", sharded)) for c, r in (("plain", plain), ("ckpt", ckpt))}
        plan[name] = dict(plain=plain, checkpointed=ckpt, weights=weights, sharded=sharded, batches=batches)
        rows.append([name, f"{plain['trainable'] / 1e6:,.1f}M", f"{plain['frozen'] / 1e6:,.0f}M",
                     f"{16 * plain['trainable'] / gib:.1f}", f"{weights / gib:.1f} / {sharded / gib:.1f}",
                     f"{plain['per_sample'] / gib:.3f} / {ckpt['per_sample'] / gib:.3f}",
                     " / ".join(str(batches[k]) for k in (("ddp", "plain"), ("ddp", "ckpt"), ("fsdp", "plain"),
                                                          ("fsdp", "ckpt")))])
    print(common.machine_description())
    print(f"memory plan from configs on the meta device (no GPU measured): {args.gpu_gb:g} GB GPUs, {args.gpus} of them "
          f"for FSDP; LM config: {args.llm} ({plan[next(k for k in plan if k.startswith('stage 2'))]['plain']['source']})")
    print(common.markdown_table(
        ["stage", "trainable", "frozen (bf16)", "weights + grads + AdamW of what trains (GiB)",
         f"all weights per GPU, GiB: DDP / FSDP over {args.gpus}", "activations per sample, GiB: plain / checkpointed",
         "largest batch per GPU: DDP / DDP+ckpt / FSDP / FSDP+ckpt"], rows))
    print()
    hours = []
    for name, p in plan.items():
        per_sample = {k: p[k]["flops"] for k in ("plain", "checkpointed")}
        gpu_hours = {k: v * 1e6 / (args.gpu_tflops * 1e12 * args.mfu) / 3600 for k, v in per_sample.items()}
        extra = ""
        if name.startswith("stage 1"):
            extra = f"{VLV_STAGE1_GPU_HOURS / gpu_hours['checkpointed']:.0f}M images in VLV's {VLV_STAGE1_GPU_HOURS} GPU-hours"
        hours.append([name, f"{per_sample['plain'] / 1e12:.2f} / {per_sample['checkpointed'] / 1e12:.2f}",
                      f"{gpu_hours['plain']:.1f} / {gpu_hours['checkpointed']:.1f}", extra])
    print(common.markdown_table(
        ["stage", "TFLOPs per training sample: plain / checkpointed",
         f"GPU-hours per 1M samples at {args.gpu_tflops:g} TFLOP/s x MFU {args.mfu:g}: plain / checkpointed",
         "against the paper (stage 1: 8 GPUs x ~4 days)"], hours))
    return plan


if __name__ == "__main__":
    errors.run(main)
