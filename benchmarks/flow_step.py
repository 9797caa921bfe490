"""A flow-matching training step of this project's flow against torchcfm's ConditionalFlowMatcher,
on the same velocity network, batch and optimiser (the toy preset's flow on [16, 64] z).

Both draw t ~ U[0, 1] and the straight path (torchcfm with sigma = 0 is the same path): the
step differs only in how x_t and the target are made and the loss taken. Settings take turns;
medians of the turns. Needs `pip install -r benchmarks/requirements.txt` for torchcfm (without it,
only this project's row).

    python -m benchmarks.flow_step
"""
import argparse
import time

import torch

import common
import errors
from benchmarks import timing
from models.flow import Flow


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--seq_len", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="steps a turn")
    p.add_argument("--turns", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    shape = (args.seq_len, args.dim)
    flow = Flow(dict(seq_len=args.seq_len, dim=args.dim, width=args.width, depth=args.depth, heads=4),
                torch.zeros(shape), torch.ones(shape), torch.zeros(shape), torch.ones(shape))
    optimizer = torch.optim.AdamW(flow.parameters(), lr=1e-4, fused=True)
    x0, x1 = torch.randn(args.batch_size, *shape), torch.randn(args.batch_size, *shape)

    def ours():
        return flow(x0, x1, torch.rand(args.batch_size))

    steps = {"this project (models.flow)": ours}
    try:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
        matcher = ConditionalFlowMatcher(sigma=0.0)

        def torchcfm():
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
            return (flow.net(xt, t) - ut).pow(2).mean()

        steps["torchcfm ConditionalFlowMatcher"] = torchcfm
    except ImportError:
        print("torchcfm is not installed (pip install -r benchmarks/requirements.txt): its row is left out")

    def step(loss_fn):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = {name: [] for name in steps}
    for name, fn in steps.items():  # warm-up
        step(fn)
    for _ in range(args.turns):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(fn)
            times[name].append((time.perf_counter() - start) / args.steps)
    print(common.machine_description())
    timing.print_medians(f"flow-matching training step, batch {args.batch_size} x {list(shape)}, width "
                         f"{args.width}, depth {args.depth}, fp32, medians of {args.turns} turns of {args.steps}",
                         times)
    return times


if __name__ == "__main__":
    errors.run(main)
