"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU): a tiny flow trained
through common.Trainer with its parameters sharded by FSDP2 (torch's fully_shard), as accelerate's
FSDP2 plugin shards them on GPUs. (accelerate itself runs FSDP on GPUs only: on CPUs it falls back to
DDP, so the sharding is done by hand here; the Trainer's gathering and re-sharding are the same.)

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR MAX_STEPS [--resume_from latest]
"""
import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import common  # noqa: E402
from models.flow import Flow  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("max_steps", type=int)
    p.add_argument("--resume_from", default=None)
    cli = p.parse_args()
    parser = argparse.ArgumentParser()
    common.add_training_args(parser)
    args = parser.parse_args(["--output_dir", cli.out, "--max_steps", str(cli.max_steps), "--batch_size", "4",
                              "--lr", "1e-2", "--lr_warmup_steps", "1", "--checkpointing_steps", "2",
                              "--checkpoints_total_limit", "0", "--use_ema", "--ema_decay", "0.9",
                              "--num_workers", "0", "--mixed_precision", "no", "--log_every", "1"]
                             + (["--resume_from", cli.resume_from] if cli.resume_from else []))
    accelerator, _ = common.setup_run(args, "fsdp_test")
    torch.manual_seed(0)  # the same initial weights in every process
    L, D = 4, 8
    flow = Flow(dict(seq_len=L, dim=D, width=16, depth=2, heads=2), torch.zeros(L, D), torch.ones(L, D),
                torch.zeros(L, D), torch.ones(L, D))
    for p_ in flow.net.parameters():  # away from adaLN-Zero's zeros, so every tensor trains
        torch.nn.init.normal_(p_, std=0.1)
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    for block in flow.net.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(flow, mesh=mesh)
    x1 = torch.randn(64, L, D, generator=torch.Generator().manual_seed(1))
    loader = common.train_loader(common.IndexDataset(len(x1)), args, accelerator)
    optimizer, lr_scheduler, steps_per_epoch, max_steps = common.build_optimization(
        accelerator, args, flow.parameters(), loader)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    trainer = common.Trainer(accelerator=accelerator, args=args, model=flow, optimizer=optimizer,
                             lr_scheduler=lr_scheduler, loader=loader, steps_per_epoch=steps_per_epoch,
                             max_steps=max_steps, kind="flow", prefix="flow", config={}, model_state=flow.state_dict,
                             load_model_state=flow.load_state_dict)
    common.resume(trainer, args)

    def compute_loss(batch):
        target = x1[batch["index"]]
        return flow(torch.randn(target.shape), target, torch.rand(len(target)))

    trainer.train(compute_loss)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
