"""The bridge's DDPM training step against denoising-diffusion-pytorch's own GaussianDiffusion1D +
Trainer1D on the same Unet1D, batch and data, and the bridge's inference (5 UNet calls) against
the seed's 600-step reading.

Both steps: forward, backward, gradient clipping at 1, Adam, EMA 0.995 (ours: diffusers' EMAModel
every step, through accelerate as train_diffusion_bridge.py runs; theirs: ema_pytorch every 10
steps, their DataLoader with num_workers = cpu_count()). Shapes: the toy preset's [16, 64]
embeddings (sequence layout, Unet1D dim 16, mults 1,2,4) and the paper's CLIP vectors [1, 512]
(dim 32, mults 1,2,4,8, the widths of the paper's vendored copy). Goal: ours >= 1.0x theirs.

    python -m benchmarks.bridge_step [--steps 20 --inference_batch_size 8]
"""
import argparse
import sys
import tempfile
import time

import torch

import common
from models.bridge import Bridge, default_config

SHAPES = {"toy [16, 64]": (16, 64, 16, [1, 2, 4]), "paper [1, 512]": (1, 512, 32, [1, 2, 4, 8])}


def ours(seq_len, dim, unet_dim, mults, data, steps, batch):
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    bridge = Bridge(default_config(seq_len, dim, unet_dim=unet_dim, dim_mults=mults))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(bridge.unet.parameters(), lr=8e-5, weight_decay=0.0, fused=True)
    model, optimizer = accelerator.prepare(bridge, optimizer)
    params = list(bridge.unet.parameters())
    ema = EMAModel(params, decay=0.995)
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        x0 = data[torch.randint(0, len(data), (batch,))]
        loss = model(x0)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        times.append(time.perf_counter() - start)
    return sum(times[3:]) / steps


def theirs(seq_len, dim, unet_dim, mults, data, steps, batch):
    from denoising_diffusion_pytorch import GaussianDiffusion1D, Trainer1D, Unet1D
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch_1d import Dataset1D
    torch.manual_seed(0)
    diffusion = GaussianDiffusion1D(Unet1D(dim=unet_dim, dim_mults=tuple(mults), channels=seq_len), seq_length=dim,
                                    timesteps=1000, objective="pred_x0", auto_normalize=False)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer1D(diffusion, Dataset1D(data), train_batch_size=batch, train_lr=8e-5, train_num_steps=3,
                            ema_decay=0.995, save_and_sample_every=10 ** 9, results_folder=folder)
        trainer.train()  # warm-up, as ours
        trainer.train_num_steps = 3 + steps
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / steps


def inference(seq_len, dim, unet_dim, mults, data, batch):
    torch.manual_seed(0)
    bridge = Bridge(default_config(seq_len, dim, unet_dim=unet_dim, dim_mults=mults)).eval()
    out = {}
    for steps in (5, 600):
        bridge.denoise(data[:batch], 600, 1)
        start = time.perf_counter()
        bridge.denoise(data[:batch], 600, steps)
        out[steps] = (time.perf_counter() - start) / batch
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--inference_batch_size", type=int, default=8)
    p.add_argument("--shapes", default="toy,paper", help="which of toy, paper (comma-separated)")
    args = p.parse_args(argv)
    rows, speed = [], []
    for name, (seq_len, dim, unet_dim, mults) in SHAPES.items():
        if name.split()[0] not in args.shapes.split(","):
            continue
        data = torch.nn.functional.normalize(torch.randn(2048, seq_len * dim), dim=1).view(2048, seq_len, dim) * 5
        a = ours(seq_len, dim, unet_dim, mults, data, args.steps, args.batch_size)
        b = theirs(seq_len, dim, unet_dim, mults, data, args.steps, args.batch_size)
        rows.append([name, f"{1000 * a:.1f}", f"{1000 * b:.1f}", f"{b / a:.2f}x"])
        t = inference(seq_len, dim, unet_dim, mults, data, args.inference_batch_size)
        speed.append([name, f"{1000 * t[5]:.2f}", f"{1000 * t[600]:.2f}", f"{t[600] / t[5]:.0f}x"])
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(common.machine_description())
    print(f"training step, batch {args.batch_size}, mean of {args.steps} after 3 warm-up steps")
    print(common.markdown_table(["embeddings", "ours ms/step", "GaussianDiffusion1D + Trainer1D ms/step",
                                 "ours is faster by"], rows))
    print()
    print(f"bridge inference, batch {args.inference_batch_size}")
    print(common.markdown_table(["embeddings", "5 DDIM steps from t0 600: ms/embedding",
                                 "600 steps (the seed's reading): ms/embedding", "5 steps is faster by"], speed))
    return rows, speed


if __name__ == "__main__":
    main()
