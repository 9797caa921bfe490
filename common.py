"""Plumbing shared by the training scripts: presets, accelerate set-up, checkpoints, RNG, grids.

Written once here so every stage saves, resumes and logs the same way (DESIGN.md, Conventions).
"""
import argparse
import contextlib
import json
import os
import random
import re
import sys

import numpy as np
import torch

# Named configs. A script's parser holds the real-run defaults (SD 2.1, COCO); a preset replaces
# the defaults of the flags that script has, and any flag given on the command line still wins.
PRESETS = {
    "sd21": {
        "all": dict(sd_model_id="stabilityai/stable-diffusion-2-1-base", image_size=384,
                    backbone="resnet50", backbone_weights="imagenet"),
    },
    "toy": {
        "all": dict(data_dir="checkpoints/toy/data", sd_model_id="checkpoints/toy/teacher",
                    mixed_precision="no", num_inference_steps=20, guidance_scale=2.0),
        "stage1": dict(image_size=32, backbone="toy", backbone_weights="none", encoder_width=128,
                       encoder_layers=2, cache_latents=True, batch_size=128, lr=1e-3, lr_warmup_steps=50,
                       mixed_precision="bf16", max_steps=800,
                       checkpointing_steps=200, validation_steps=200, num_validation_images=8),
        "stage2": dict(llm="checkpoints/toy/lm", batch_size=64, lr=1e-3, lr_warmup_steps=50, two_object_repeat=3,
                       caption_loss="posterior_ref", mixed_precision="bf16", max_steps=1400,
                       checkpointing_steps=700, validation_steps=700),
    },
}


def die(message):
    """Stop with one clear line on stderr (no traceback): what is wrong and the fix."""
    raise SystemExit(f"error: {message}")


def parse_with_preset(parser, argv=None, stage=None):
    """Parse argv after applying `--preset NAME`'s defaults (its "all" part, then its part for
    this stage) to the flags this parser knows."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="named config that sets sizes and paths; explicit flags override it")
    pre, _ = parser.parse_known_args(argv)
    if pre.preset:
        preset = {**PRESETS[pre.preset].get("all", {}), **PRESETS[pre.preset].get(stage, {})}
        actions = {action.dest: action for action in parser._actions}
        for k, v in preset.items():
            # a store_true flag the preset turns on could not be turned off again from the command line
            if isinstance(actions.get(k), argparse._StoreTrueAction) and v:
                raise ValueError(f"preset {pre.preset!r} sets --{k}, a store_true flag no command line can "
                                 f"unset: declare it with action=argparse.BooleanOptionalAction")
        parser.set_defaults(**{k: v for k, v in preset.items() if k in actions})
    return parser.parse_args(argv)


def add_data_args(parser, data_help, image_size=None, image_size_help=None):
    """The data flags the training stages share; returns the group for stage-specific ones."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_dir", default=None, help=data_help)
    g.add_argument("--split", default="train")
    g.add_argument("--karpathy_json", default=None, help="dataset_coco.json for the Karpathy split")
    g.add_argument("--subset_ratio", type=float, default=1.0)
    g.add_argument("--image_size", type=int, default=image_size, help=image_size_help)
    return g


def add_training_args(parser):
    """Flags every training stage shares: optimisation, accelerate, checkpoints, logging."""
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=32, help="per process")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight_decay", type=float, default=1e-2)
    g.add_argument("--lr_scheduler", default="cosine",
                   choices=["constant", "constant_with_warmup", "linear", "cosine"])
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--max_steps", type=int, default=None,
                   help="optimizer steps; overrides --epochs when given (0: use --epochs)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--checkpointing_steps", type=int, default=1000)
    g.add_argument("--checkpoints_total_limit", type=int, default=3,
                   help="keep this many numbered checkpoints (0 keeps all)")
    g.add_argument("--resume_from", default=None, help="'latest' or a checkpoint path")
    g.add_argument("--report_to", default="none", choices=["none", "wandb", "tensorboard"])
    g.add_argument("--log_every", type=int, default=10)
    g.add_argument("--validation_steps", type=int, default=1000,
                   help="every N steps (and at the end; 0: only at the end) show the stage's samples: "
                        "original | reconstruction grids (stage 1), captions (stage 2)")
    g.add_argument("--num_validation_images", type=int, default=4)
    return g


def validation_items(dataset, n):
    """The first n readable items of n different images: the fixed images a run shows samples of.
    (A caption dataset holds an image once per caption, and more often with repeat_images.)"""
    image_of = (lambda i: dataset.items[i][0]) if hasattr(dataset, "items") else (lambda i: i)
    firsts = {}
    for i in range(len(dataset)):
        if len(firsts) == n:
            break
        firsts.setdefault(image_of(i), i)
    items = [dataset[i] for i in firsts.values()]
    return [x for x in items if x is not None]


def make_accelerator(args, project_name):
    """An Accelerator for the flags of add_training_args; wandb runs offline unless logged in."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        die("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision no (or bf16)")
    if (args.mixed_precision == "bf16" and not torch.cuda.is_available()
            and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())):
        print("warning: --mixed_precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is "
              "emulated and may be slower than fp32: pass --mixed_precision no", file=sys.stderr)
    if args.report_to == "wandb" and "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # no key here: keep the run, sync it later
    accelerator = Accelerator(
        # Without a GPU, accelerate detects torchrun's processes only when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
        # Seeded sampler: the data order is a function of (seed, epoch), so a resumed run sees the
        # same batches as one never stopped.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config=config)
    return accelerator


def attention_kernel(device, mixed_precision):
    """The context for a training step's forward and backward: on a CPU in bf16, SDPA's plain
    math kernel. PyTorch's CPU flash-attention backward in bf16 is slow at the toy sizes (a few
    heads of 16-32 dims over 16-64 positions): 41 ms a call, against 3.5 ms in fp32, a quarter of
    a bf16 stage-1 step (README, "bf16 on the CPU"). Elsewhere: the default kernel choice."""
    if torch.device(device).type == "cpu" and mixed_precision == "bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Files written atomically: a run killed at any moment leaves either the old file or the new one.

def _replace(tmp, path):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    _replace(tmp, path)


def save_checkpoint(path, state):
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    _replace(tmp, path)


def save_grid(path, images, nrow):
    """images [N,3,H,W] in [0,1] -> one PNG grid, nrow images per row."""
    from torchvision.utils import save_image
    tmp = f"{path}.tmp.png"
    save_image(images.float().clamp(0, 1), tmp, nrow=nrow, padding=2, pad_value=1.0)
    _replace(tmp, path)


def load_checkpoint(path, kind):
    """Load a checkpoint written by save_checkpoint and check it is of the expected kind."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} does not exist; pass the .pt file a training run wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or unsafe-type errors all mean the same to the user
        die(f"{path} is not a checkpoint this project can read ({type(e).__name__}); "
            f"pass a {kind} checkpoint written by this code")
    found = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if found != kind:
        die(f"{path} is a {found or 'foreign'} checkpoint, not a {kind} one; "
            f"pass the {kind} checkpoint (e.g. the one its training run wrote)")
    return ckpt


def list_checkpoints(output_dir, prefix):
    """Numbered checkpoints `{prefix}_{step}.pt` in output_dir, oldest first."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.pt$")
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = pattern.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from, output_dir, prefix):
    """`latest` -> newest checkpoint in output_dir (None if there is none yet); else the path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir, prefix)
        return ckpts[-1] if ckpts else None
    return resume_from


def prune_checkpoints(output_dir, prefix, keep):
    if keep and keep > 0:
        for path in list_checkpoints(output_dir, prefix)[:-keep]:
            os.remove(path)


# ---------------------------------------------------------------------------------------------
# RNG state, saved per process so a resumed run draws the same noise and timesteps.

def rng_state():
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's key array is not among the types weights_only loading allows: store a tensor.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def print_main(accelerator, *args):
    if accelerator.is_main_process:
        print(*args, file=sys.stderr, flush=True)



# ---------------------------------------------------------------------------------------------
# The training loop every stage shares: it owns stepping, accumulation, clipping, EMA, logging,
# checkpoint cadence and exact resume; a stage supplies the loss and what a checkpoint holds.

def fingerprint(state_dict):
    """A short hash of a state dict's tensors: tells whether two checkpoints hold the same weights."""
    import hashlib
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_optimization(accelerator, args, params, loader):
    """AdamW + warmup/decay schedule sized from the prepared loader. Returns
    (optimizer, lr_scheduler, steps_per_epoch, max_steps)."""
    from diffusers.optimization import get_scheduler
    # fused: one kernel for all the parameters, not a loop over them (the optimiser's part of a
    # toy stage-2 step on the CPU: 9 ms, not 18; on a GPU it is the faster kernel too)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    steps_per_epoch = max(1, -(-len(loader) // args.gradient_accumulation_steps))
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    # Counted in scheduler.step() calls: accelerate steps a prepared scheduler once per process.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    return optimizer, lr_scheduler, steps_per_epoch, max_steps


class Trainer:
    """Runs the optimisation of one prepared model.

    model_state() -> the trainable weights to save; load_model_state(sd) puts them back. A
    checkpoint is the plain dict of DESIGN.md: {kind, model, optimizer, lr_scheduler, scaler, ema,
    step, epoch, config, rng}, with one RNG state per process.
    """

    def __init__(self, accelerator, args, model, optimizer, lr_scheduler, loader, steps_per_epoch,
                 max_steps, kind, prefix, config, model_state, load_model_state):
        self.accelerator, self.args, self.model = accelerator, args, model
        self.optimizer, self.lr_scheduler, self.loader = optimizer, lr_scheduler, loader
        self.steps_per_epoch, self.max_steps = steps_per_epoch, max_steps
        self.kind, self.prefix, self.config = kind, prefix, config
        self.model_state, self.load_model_state = model_state, load_model_state
        # What trains (frozen parts excluded): what is clipped, averaged by EMA and checksummed.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = None
        if args.use_ema:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(self.params, decay=args.ema_decay)
        self.step = 0
        self.epoch_times = {}  # epoch -> [seconds, steps] of this invocation: data + compute only

    def resume(self, path):
        ckpt = load_checkpoint(path, self.kind)
        if ckpt["step"] > self.max_steps:  # e.g. an output_dir left by a longer recipe: it would train nothing
            die(f"{path} is at step {ckpt['step']}, past --max_steps {self.max_steps}; pass --max_steps "
                f"{ckpt['step']} or more to go on from it, or a new --output_dir to start over")
        self.load_model_state(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        if len(ckpt["rng"]) == self.accelerator.num_processes:
            set_rng_state(ckpt["rng"][self.accelerator.process_index])
        self.step = ckpt["step"]
        print_main(self.accelerator, f"resumed from {path} at step {self.step}")
        return ckpt

    def save(self):
        from accelerate.utils import gather_object
        rng = gather_object([rng_state()])  # every process's, collected before only one writes
        if not self.accelerator.is_main_process:
            return
        state = dict(kind=self.kind, model=self.model_state(), optimizer=self.optimizer.state_dict(),
                     lr_scheduler=self.lr_scheduler.state_dict(),
                     scaler=self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
                     ema=self.ema.state_dict() if self.ema else None, step=self.step,
                     epoch=self.step // self.steps_per_epoch, config=self.config, rng=rng)
        out = self.args.output_dir
        save_checkpoint(os.path.join(out, f"{self.prefix}_{self.step}.pt"), state)
        prune_checkpoints(out, self.prefix, self.args.checkpoints_total_limit)

    def with_ema_weights(self, fn):
        """Run fn() with the EMA weights in the model (if any), in eval mode, then restore."""
        model = self.accelerator.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        model.eval()
        try:
            return fn()
        finally:
            model.train()
            if self.ema is not None:
                self.ema.restore(self.params)

    def train(self, compute_loss, validate=None, validation_steps=0, desc="train"):
        """compute_loss(batch) -> scalar loss; validate(step) runs on the main process only."""
        import time
        from tqdm.auto import tqdm
        acc, args = self.accelerator, self.args
        progress = tqdm(total=self.max_steps, initial=self.step, desc=desc, disable=not acc.is_main_process)
        self.model.train()
        first_epoch = self.step // self.steps_per_epoch
        num_epochs = -(-self.max_steps // self.steps_per_epoch)
        for epoch in range(first_epoch, num_epochs):
            if self.step >= self.max_steps:
                break
            self.loader.set_epoch(epoch)  # seeded order: the same batches a resumed run would see
            batches = self.loader
            done = self.step - epoch * self.steps_per_epoch
            if done:
                batches = acc.skip_first_batches(self.loader, done * args.gradient_accumulation_steps)
            seconds, start_step, tick = 0.0, self.step, time.perf_counter()
            for batch in batches:
                if batch is None:  # every image of the batch was unreadable (each already warned)
                    continue
                with acc.accumulate(self.model), attention_kernel(acc.device, args.mixed_precision):
                    loss = compute_loss(batch)
                    acc.backward(loss)
                    if acc.sync_gradients and args.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.params, args.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                self.step += 1
                if self.ema is not None:
                    self.ema.step(self.params)
                seconds += time.perf_counter() - tick
                progress.update(1)
                last = self.step == self.max_steps
                if self.step % args.log_every == 0 or last:
                    logs = {"loss": acc.reduce(loss.detach(), "mean").item(),
                            "lr": self.lr_scheduler.get_last_lr()[0]}
                    progress.set_postfix(**logs)
                    acc.log(logs, step=self.step)
                if self.step % args.checkpointing_steps == 0 or last:
                    self.save()
                if validate and acc.is_main_process and (
                        (validation_steps and self.step % validation_steps == 0) or last):
                    self.with_ema_weights(lambda: validate(self.step))
                if self.step >= self.max_steps:
                    break
                tick = time.perf_counter()  # checkpoints and samples are not counted
            self.epoch_times[epoch] = [seconds, self.step - start_step]
        progress.close()

    def finish(self, skipped=0):
        """Write summary.json (with one weight checksum per process, to show they stayed in sync)."""
        from accelerate.utils import gather_object
        acc = self.accelerator
        checksum = sum(p.double().sum().item() for p in self.params)
        checksums, skips = gather_object([checksum]), gather_object([skipped])
        if acc.is_main_process:
            save_json(os.path.join(self.args.output_dir, "summary.json"),
                      dict(step=self.step, num_processes=acc.num_processes,
                           epoch_seconds_and_steps=self.epoch_times,
                           param_checksums=checksums, skipped_images=sum(skips)))
        acc.wait_for_everyone()
        acc.end_training()
