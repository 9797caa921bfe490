"""Peak memory and step time of stage 1 and stage 2 at the paper's shapes, on a GPU, with random
weights built from the published configs (nothing downloaded): with and without gradient
checkpointing, in bf16 autocast and in fp16 autocast with a GradScaler, beside the memory plan's
estimate of the same batch (benchmarks.memory_plan).

    python -m benchmarks.gpu_step                                   # on the GPU: the prepared device script
    python -m benchmarks.gpu_step --device cpu --sizes tiny         # the same code on tiny configs (the test)

What trains is fp32 (AdamW), what is frozen is in the half dtype, as the training scripts run them.
"""
import argparse
import statistics
import time

import torch

import common
import errors
from benchmarks import memory_plan

TINY = dict(
    unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
              norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
              use_linear_projection=True),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
             norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             sample_size=16),
    text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=100, max_position_embeddings=16),
    image_size=64, seq_len=16, dim=32, backbone="toy", caption_tokens=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default="paper", choices=["paper", "tiny"])
    p.add_argument("--llm", default="Qwen/Qwen2.5-3B", help="the stage-2 LM's config (memory_plan.llm_config)")
    p.add_argument("--stage1_batch", type=int, default=64, help="the paper's 64 images per GPU")
    p.add_argument("--stage2_batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    p.add_argument("--precisions", default="bf16,fp16",
                   help="the GPU's autocast precisions to measure (with --device cpu, bf16 is emulated on CPUs "
                        "without AMX or AVX512-BF16, about 10x slower than fp32)")
    return p.parse_args(argv)


def sizes_of(args):
    if args.sizes == "paper":
        plan_args = memory_plan.parse_args(["--llm", args.llm])
        return memory_plan.paper_sizes(plan_args)
    from transformers import Qwen2Config
    llm = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)
    return dict(TINY, llm=llm, llm_source="tiny")


def run(build, sizes, batch, precision, checkpointing, args):
    """(peak GiB or None when out of memory, median seconds per step) of one configuration."""
    device = torch.device(args.device)
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        torch.manual_seed(0)
        stage = build(sizes, device, torch.float32, half, checkpointing)
        stage.trainable.train()
        params = [p for p in stage.trainable.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        times = []
        for k in range(args.steps + 1):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=half):
                loss = stage.step(batch)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if k:  # the first step warms the kernels up
                times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        del stage, optimizer
        return peak, statistics.median(times)
    except torch.OutOfMemoryError:
        return "out of memory", None


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        common.die("no CUDA GPU here: this benchmark measures a GPU (--device cpu --sizes tiny runs its code on the CPU)")
    sizes = sizes_of(args)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else common.machine_description()
    print(f"{device}; torch {torch.__version__}; {args.sizes} sizes; {args.steps} timed steps after one warm-up")
    rows, results = [], {}
    stages = (("stage 1", memory_plan.build_stage1, args.stage1_batch),
              ("stage 2", memory_plan.build_stage2, args.stage2_batch))
    for name, build, batch in stages:
        for checkpointing in (False, True):
            plan = memory_plan.planned(build, sizes, checkpointing, torch.bfloat16)
            estimate = (16 * plan["trainable"] + 2 * plan["frozen"] + plan["static"] + batch * plan["per_sample"]) / 2 ** 30
            for precision in args.precisions.split(","):
                peak, seconds = run(build, sizes, batch, precision, checkpointing, args)
                results[name, checkpointing, precision] = (peak, seconds)
                rows.append([name, batch, "on" if checkpointing else "off", precision,
                             peak if isinstance(peak, str) else "n/a (CPU)" if peak is None else f"{peak:.2f}",
                             f"{estimate:.2f}",
                             "-" if seconds is None else f"{seconds:.3f}"])
    print(common.markdown_table(["stage", "batch", "checkpointing", "precision", "peak GiB (measured)",
                                 "plan GiB (memory_plan)", "s/step"], rows))
    return results


if __name__ == "__main__":
    errors.run(main)
