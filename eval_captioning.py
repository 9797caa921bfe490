"""Score captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap), CLIPScore, toy attributes.

From a predictions file (COCO results format: a JSON list of {"image_id", "caption"}, or JSONL):
    python eval_captioning.py --preds_json preds.json --ann_json data/annotations/captions_val2017.json \
        --metrics bleu,meteor,rouge,cider --out_json scores.json
From a trained VLV (captions are appended to --out_jsonl as they are made; a re-run resumes):
    python eval_captioning.py --stage1_ckpt checkpoints/toy/stage1 --stage2_ckpt checkpoints/toy/stage2 \
        --data_dir checkpoints/toy/data --split val --num_samples 200 --out_jsonl preds.jsonl --regen
(a checkpoint file, or a run's --output_dir for its newest checkpoint)
Add --clip_model DIR (a local transformers CLIPModel folder) for CLIPScore / RefCLIPScore, and
--spice for SPICE (it downloads Stanford CoreNLP on first use, so it is off by default).
--metrics ...,fid --fid_weights FILE (model mode): VLV's reconstruction FID, the split's images against
their regenerations from the predicted captions and from z (InceptionV3 pool3, pytorch-fid style).
"""
import argparse
import contextlib
import io
import os
import shutil
import sys

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset, image_transform, load_rgb, read_captions, read_pixels
from data.predictions import read_predictions, run_predictions
from errors import UnreadableImage

CAPTION_METRICS = ("bleu", "meteor", "rouge", "cider")
KNOWN_METRICS = CAPTION_METRICS + ("clip", "fid")
# torch-fidelity's port of the TF Inception that pytorch-fid and the papers' FIDs use
FID_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                   "weights-inception-2015-12-05-6726825d.pth")
# Hessel et al. (2021): CLIP-S = W * max(cos, 0), the text prefixed with PREFIX (references too).
CLIP_W = 2.5
CLIP_PREFIX = "A photo depicts "
CLIP_SCALE_NOTE = "Hessel et al. scale 2.5*max(cos,0); torchmetrics' CLIPScore is 100*cos"
# Characters Java's PTBTokenizer may treat as line ends: one inside a caption would shift every
# later caption onto the wrong image, so they become spaces first.
LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x85\u2028\u2029"})


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("scoring a predictions file")
    g.add_argument("--preds_json", default=None,
                   help="COCO results JSON (a list of {image_id, caption}) or JSONL of the same records")
    g.add_argument("--ann_json", default=None, help="COCO captions annotation file (the references)")
    g.add_argument("--image_dir", default=None,
                   help="images of --ann_json (for CLIPScore and the sheet); default: the COCO layout "
                        "DIR/<split> next to DIR/annotations/captions_<split>.json")
    g = p.add_argument_group("metrics and outputs")
    g.add_argument("--metrics", default="bleu,meteor,rouge,cider,clip",
                   help=f"comma-separated, from: {', '.join(KNOWN_METRICS)}")
    g.add_argument("--spice", action="store_true",
                   help="also SPICE (downloads Stanford CoreNLP the first time; needs the network)")
    g.add_argument("--clip_model", default=None, help="local folder of a transformers CLIPModel")
    g.add_argument("--clip_batch_size", type=int, default=32)
    g.add_argument("--fid_weights", default=None,
                   help=f"fid: a local copy of the FID Inception weights ({FID_WEIGHTS_URL}); nothing is downloaded")
    g.add_argument("--fid_batch_size", type=int, default=32)
    g.add_argument("--out_json", default=None, help="scores; default: <predictions>.scores.json")
    g.add_argument("--sheet", default=None, help="PNG sheet; default: <predictions>.sheet.png")
    g.add_argument("--num_sheet_images", type=int, default=16, help="0: no sheet")
    g = p.add_argument_group("captioning with a trained VLV")
    g.add_argument("--stage1_ckpt", default=None, help="vision_encoder_{step}.pt, or the stage-1 run's folder")
    g.add_argument("--stage2_ckpt", default=None, help="captioner_{step}.pt, or the stage-2 run's folder")
    g.add_argument("--data_dir", default=None, help="COCO 2017 root (annotations/, val2017/)")
    g.add_argument("--split", default="val")
    g.add_argument("--karpathy_json", default=None, help="dataset_coco.json for the Karpathy split")
    g.add_argument("--data_format", default="coco", choices=["coco", "flickr30k"],
                   help="flickr30k: captions.txt or results_20130124.token (test/val need --karpathy_json)")
    g.add_argument("--num_samples", type=int, default=None, help="first N images of the split (default: all)")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--out_jsonl", default=None, help="predictions, appended as made; a re-run resumes")
    g.add_argument("--regen", action="store_true",
                   help="draw each sheet image again from its predicted caption, beside the original")
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=2.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_decoding_args(p, num_beams=3)
    common.add_enhancer_args(p)
    return p


def parse_metrics(text):
    metrics = [m.strip().lower() for m in text.split(",") if m.strip()]
    for m in metrics:
        if m == "spice":
            common.die("--metrics: SPICE is behind its own flag --spice (it downloads Stanford CoreNLP)")
        if m not in KNOWN_METRICS:
            common.die(f"--metrics: unknown metric '{m}'; choose from {', '.join(KNOWN_METRICS)}")
    if not metrics:
        common.die("--metrics is empty; give e.g. bleu,meteor,rouge,cider")
    return metrics


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.metrics = parse_metrics(args.metrics)
    model_mode = args.stage1_ckpt is not None or args.stage2_ckpt is not None
    if "fid" in args.metrics:
        if not model_mode:
            common.die("--metrics fid scores the model's regenerations: it needs --stage1_ckpt and --stage2_ckpt")
        check_fid_weights(args.fid_weights)
    if args.preds_json and model_mode:
        common.die("give either --preds_json (score a file) or --stage1_ckpt/--stage2_ckpt (caption with "
                   "a model), not both")
    if model_mode:
        if not (args.stage1_ckpt and args.stage2_ckpt):
            common.die("model mode needs both --stage1_ckpt and --stage2_ckpt")
        if not args.data_dir:
            common.die("model mode needs --data_dir (the COCO root or the toy world's data folder)")
        if not args.out_jsonl:
            common.die("model mode needs --out_jsonl: the predictions go there as they are made")
        if args.num_samples is not None and args.num_samples < 1:
            common.die(f"--num_samples {args.num_samples} must be at least 1 (leave it out for the whole split)")
        if args.batch_size < 1:
            common.die(f"--batch_size {args.batch_size} must be at least 1")
    elif args.preds_json:
        if not args.ann_json:
            common.die("--preds_json needs --ann_json, the COCO captions file holding the references")
        for flag, path in (("--preds_json", args.preds_json), ("--ann_json", args.ann_json)):
            if not os.path.isfile(path):
                common.die(f"{flag} {path} does not exist")
        if args.regen:
            common.die("--regen draws images with the model; it needs --stage1_ckpt and --stage2_ckpt")
        if args.enhancer != "none":
            common.die("--enhancer acts on a model's z; it needs --stage1_ckpt and --stage2_ckpt, not --preds_json")
    else:
        common.die("nothing to score: give --preds_json FILE --ann_json FILE, or --stage1_ckpt and "
                   "--stage2_ckpt with --data_dir")
    if args.clip_model and "clip" in args.metrics and not os.path.isdir(args.clip_model):
        common.die(f"--clip_model {args.clip_model} is not a local folder; pass a saved transformers "
                   "CLIPModel folder (nothing is downloaded)")
    if args.image_dir and not os.path.isdir(args.image_dir):
        common.die(f"--image_dir {args.image_dir} does not exist")
    stem = os.path.splitext(args.preds_json or args.out_jsonl)[0]
    args.out_json = args.out_json or f"{stem}.scores.json"
    args.sheet = args.sheet or f"{stem}.sheet.png"
    return args


# ---------------------------------------------------------------------------------------------
# Reference-based metrics (pycocoevalcap, as COCOEvalCap runs them)

def score_captions(preds, refs, metrics, spice=False):
    """preds {image_id: caption}, refs {image_id: [captions]} -> {"BLEU-1".., "METEOR", "ROUGE-L",
    "CIDEr-D", "SPICE"} for the metrics asked. Scored over the images of preds, in preds' order."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    metrics = [m for m in metrics if m in CAPTION_METRICS]
    if not metrics and not spice:
        return {}
    ids = list(preds)
    if not ids:
        common.die("no predictions to score")
    for i in ids:
        if not refs.get(i):
            common.die(f"image {i!r} has no reference captions; score only images of the annotation file")
    if shutil.which("java") is None:
        common.die("java is not on PATH; the PTB tokenizer and METEOR need a Java runtime (e.g. apt install "
                   "openjdk-17-jre-headless)")

    # One tokenizer run (one JVM) for references and predictions; it works line by line, so the
    # tokens are those of COCOEvalCap's two separate runs.
    clean = lambda text: {"caption": str(text).translate(LINE_BREAKS)}
    batch = {("gts", i): [clean(r) for r in refs[i]] for i in ids}
    batch.update({("res", i): [clean(preds[i])] for i in ids})
    with contextlib.redirect_stdout(io.StringIO()):
        tokens = PTBTokenizer().tokenize(batch)
    for key, sentences in batch.items():
        if len(tokens.get(key, [])) != len(sentences):
            common.die(f"the PTB tokenizer lost lines at image {key[1]!r}; check that Java runs "
                       "(`java -version`) and that the captions are plain text")
    gts = {i: tokens[("gts", i)] for i in ids}
    res = {i: tokens[("res", i)] for i in ids}

    scores = {}
    if "bleu" in metrics:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "meteor" in metrics:
        from pycocoevalcap.meteor.meteor import Meteor
        meteor = Meteor()
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        del meteor  # its __del__ stops the JVM now rather than at exit
    if "rouge" in metrics:
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        # pycocoevalcap's Cider is CIDEr-D (Gaussian length penalty, clipped counts); its idf comes
        # from the references of the images scored here, so the number depends on that set.
        scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice
        print("SPICE: first use downloads Stanford CoreNLP (about 400 MB)", file=sys.stderr)
        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores


# ---------------------------------------------------------------------------------------------
# CLIPScore / RefCLIPScore (Hessel et al., 2021)

def load_clip(clip_model_dir, device="cpu"):
    """(model, processor) from a local folder only; bad folder -> one line."""
    from transformers import CLIPModel, CLIPProcessor
    try:
        model = CLIPModel.from_pretrained(clip_model_dir, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(clip_model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        common.die(f"--clip_model {clip_model_dir}: not a loadable CLIPModel + processor folder ({first}); "
                   "pass a folder written by CLIPModel/CLIPProcessor.save_pretrained")
    return model.to(device).eval(), processor


def _features(output):
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def clip_text_features(model, processor, texts, batch_size=32):
    """Unit-norm text embeddings [N,E] of CLIP_PREFIX + text (truncated to CLIP's context)."""
    device = next(model.parameters()).device
    max_len = model.config.text_config.max_position_embeddings
    feats = []
    for s in range(0, len(texts), batch_size):
        enc = processor.tokenizer([CLIP_PREFIX + t for t in texts[s:s + batch_size]], padding=True,
                                  truncation=True, max_length=max_len, return_tensors="pt").to(device)
        feats.append(_features(model.get_text_features(input_ids=enc["input_ids"],
                                                       attention_mask=enc["attention_mask"])).float())
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1).cpu()


@torch.no_grad()
def clip_image_features(model, processor, images, batch_size=32):
    """Unit-norm image embeddings [N,E]; images is any sequence (loaded a batch at a time)."""
    device = next(model.parameters()).device
    feats = []
    for s in range(0, len(images), batch_size):
        pils = [common.to_pil(images[i]) for i in range(s, min(s + batch_size, len(images)))]
        pixels = processor.image_processor(images=pils, return_tensors="pt")["pixel_values"].to(device)
        feats.append(_features(model.get_image_features(pixel_values=pixels)).float())
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1).cpu()


def clip_scores(images, captions, refs, clip_model_dir, batch_size=32, device="cpu"):
    """images: a sequence of [3,H,W] tensors in [0,1] / PIL images; captions: list[str];
    refs: list[list[str]] or None. Returns {"CLIPScore", "RefCLIPScore" (with refs), "num_images"},
    means over images on Hessel et al.'s scale:
      CLIP-S = 2.5 * max(cos(image, "A photo depicts " + caption), 0)
      RefCLIP-S = harmonic mean(CLIP-S, max(max_r cos(caption, ref_r), 0))  (refs prefixed too)."""
    if len(images) != len(captions) or (refs is not None and len(refs) != len(captions)):
        raise ValueError(f"clip_scores: {len(images)} images, {len(captions)} captions"
                         f"{'' if refs is None else f', {len(refs)} reference lists'}: they must match")
    model, processor = load_clip(clip_model_dir, device)
    img = clip_image_features(model, processor, images, batch_size)      # [N,E]
    cap = clip_text_features(model, processor, list(captions), batch_size)  # [N,E]
    clip_s = CLIP_W * (img * cap).sum(-1).clamp(min=0)                    # [N]
    out = {"CLIPScore": clip_s.mean().item(), "num_images": len(captions)}
    if refs is not None:
        flat = [r for rs in refs for r in rs]
        owner = torch.tensor([i for i, rs in enumerate(refs) for _ in rs])
        ref_feats = clip_text_features(model, processor, flat, batch_size)  # [R,E]
        sims = (cap[owner] * ref_feats).sum(-1)                              # [R]
        best = torch.full((len(captions),), -1.0).scatter_reduce(0, owner, sims, "amax")
        best = best.clamp(min=0)
        denom = clip_s + best
        ref_s = torch.where(denom > 0, 2 * clip_s * best / denom.clamp(min=1e-12), torch.zeros_like(denom))
        out["RefCLIPScore"] = ref_s.mean().item()
    return out


# ---------------------------------------------------------------------------------------------
# FID (VLV reports reconstruction FID only: caption -> image and z -> image against the originals)

def check_fid_weights(path):
    """One line unless `path` is a readable state dict of tensors (read with weights_only=True)."""
    where = f"download {FID_WEIGHTS_URL} once and pass its path"
    if not path:
        common.die(f"--metrics fid needs --fid_weights, the Inception weights file (nothing is downloaded at run "
                   f"time); {where}")
    if not os.path.isfile(path):
        common.die(f"--fid_weights {path} does not exist; {where}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        common.die(f"--fid_weights {path} is not a weights file ({type(e).__name__}); {where}")
    if not isinstance(state, dict) or "fc.weight" not in state:
        common.die(f"--fid_weights {path} is not torch-fidelity's InceptionV3 state dict; {where}")


def fid(real, drawn, weights, batch_size=32, device="cpu"):
    """Frechet Inception distances of sets of drawn images to one set of real ones ([3,H,W] in [0,1],
    any size: resized to 299 inside) on the 2048-d pool3 features of torch-fidelity's InceptionV3
    (pytorch-fid's network), through torchmetrics. drawn: {name: images} -> {name: FID}.
    weights: a local file (check_fid_weights); at least 2 images a side."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    if min(len(real), *map(len, drawn.values())) < 2:
        common.die(f"FID needs at least 2 images a side, got {len(real)} real and "
                   f"{', '.join(str(len(v)) for v in drawn.values())} drawn")
    # torch-fidelity reads the file with weights_only=False; check_fid_weights has read it with
    # weights_only=True first, so it holds tensors only.
    check_fid_weights(weights)
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, normalize=True,
                                      reset_real_features=False).to(device)

    def add(images, is_real):
        for s in range(0, len(images), batch_size):
            metric.update(torch.stack([images[i] for i in range(s, min(s + batch_size, len(images)))]).to(device),
                          real=is_real)

    add(real, True)  # once: reset() below keeps the real statistics
    scores = {}
    for name, images in drawn.items():
        metric.reset()
        add(images, False)
        scores[name] = float(metric.compute())
    return scores


def reconstruction_fid(vlv, real, captions, args):
    """VLV's two reconstruction FIDs: real images against SD's drawings from the captions and from z."""
    from_caption, from_z = [], []
    for s in range(0, len(real), args.batch_size):
        batch = torch.stack(real[s:s + args.batch_size]).to(args.device)
        for out, c in ((from_caption, captions[s:s + args.batch_size]), (from_z, None)):
            out += list(vlv.regenerate(batch, c, args.num_inference_steps, args.guidance_scale, args.seed).cpu())
    scores = fid(real, {"FID (caption -> image)": from_caption, "FID (z -> image)": from_z}, args.fid_weights,
                 args.fid_batch_size, args.device)
    scores["fid_note"] = (f"{len(real)} images against their regenerations ({args.num_inference_steps} steps, "
                          f"guidance {args.guidance_scale}); InceptionV3 pool3 (torch-fidelity weights) via torchmetrics")
    return scores


# ---------------------------------------------------------------------------------------------
# Toy world: do the captions name the right attributes?

def attribute_accuracy(preds, images_info):
    """preds {image_id: caption}; images_info {image_id: {"scene", "heldout", ...}} ->
    data.toy_world.grouped_accuracy of the parsed captions (images without a scene not counted)."""
    from data.toy_world import attribute_scores, grouped_accuracy, parse_caption
    ids = [i for i in preds if (images_info.get(i) or {}).get("scene") is not None]
    results = [attribute_scores(parse_caption(preds[i]), images_info[i]["scene"]) for i in ids]
    return grouped_accuracy(results, [images_info[i] for i in ids])


# ---------------------------------------------------------------------------------------------
# Reports

def markdown_tables(scores):
    tables = []
    caption_keys = [k for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
                    if k in scores]
    if caption_keys:
        tables.append(common.markdown_table([f"metric (n={scores['num_images']})", "value"],
                                            [[k, f"{scores[k]:.4f}"] for k in caption_keys]))
    fid_keys = [k for k in ("FID (caption -> image)", "FID (z -> image)") if k in scores]
    if fid_keys:
        tables.append(common.markdown_table([f"reconstruction (n={scores['num_images']})", "FID"],
                                            [[k[5:-1], f"{scores[k]:.2f}"] for k in fid_keys]))
    clip_keys = [k for k in ("CLIPScore", "RefCLIPScore") if k in scores]
    if clip_keys:
        tables.append(common.markdown_table([f"CLIP metric ({CLIP_SCALE_NOTE})", "value"],
                                            [[k, f"{scores[k]:.4f}"] for k in clip_keys]))
    if scores.get("attribute_accuracy"):
        tables.append(common.accuracy_table(scores["attribute_accuracy"], "attribute (from the caption)"))
    return "\n\n".join(tables)


def save_sheet(path, images, preds, refs, regen=None):
    """A PNG of images with their predicted and first reference caption (and the image regenerated
    from the prediction beside each), written atomically."""
    from PIL import Image
    cells, tile = [], 128
    for k, image in enumerate(images):
        if regen is None:
            cells.append(common.to_pil(image))
            continue
        pair = Image.new("RGB", (2 * tile + 4, tile), "white")  # original | regenerated
        for x, im in ((0, image), (tile + 4, regen[k])):
            pair.paste(common.to_pil(im).resize((tile, tile)), (x, 0))
        cells.append(pair)
    captions = [f"pred: {p}\nref: {r}" for p, r in zip(preds, refs)]
    common.save_grid(path, cells, ncol=min(4, len(cells)), captions=captions,
                     tile=(2 * tile + 4, tile) if regen is not None else tile)


class LazyImages:
    """A sequence of images loaded on access (CLIPScore and the sheet read them a batch at a time)."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return len(self.loaders)

    def __getitem__(self, i):
        return self.loaders[i]()


# ---------------------------------------------------------------------------------------------
# The two ways in

def default_image_dir(ann_json):
    """COCO layout: ROOT/annotations/captions_val2017.json -> ROOT/val2017."""
    name = os.path.splitext(os.path.basename(ann_json))[0]
    split = name.split("_", 1)[1] if "_" in name else name
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ann_json))), split)


def preds_file_inputs(args):
    """--preds_json mode -> (preds, refs, images_info, image loaders or None)."""
    preds = read_predictions(args.preds_json)
    if not preds:
        common.die(f"--preds_json {args.preds_json} holds no predictions")
    images, refs = read_captions(args.ann_json, "pass --ann_json a COCO captions file (images, annotations "
                                                "with image_id and caption)")
    missing = [i for i in preds if i not in images]
    if missing:
        common.die(f"--preds_json {args.preds_json}: {len(missing)} image ids are not in --ann_json "
                   f"{args.ann_json} (e.g. {missing[:5]}); score predictions against their own split")
    no_refs = [i for i in preds if not refs[i]]
    if no_refs:
        common.die(f"--ann_json {args.ann_json}: images {no_refs[:5]} have no captions to compare with")
    # The annotation file's order, as COCOEvalCap uses: the same floating-point sums, the same numbers.
    preds = {i: preds[i] for i in images if i in preds}
    if len(preds) < len(images):
        print(f"scoring the {len(preds)} predicted images of the {len(images)} in {args.ann_json}",
              file=sys.stderr)
    image_dir = args.image_dir or default_image_dir(args.ann_json)
    loaders = None
    if os.path.isdir(image_dir):
        def loader(file_name):
            return lambda: load_rgb(os.path.join(image_dir, file_name))  # raises UnreadableImage
        loaders = {i: loader(images[i].get("file_name", f"{i:012d}.jpg")) for i in preds}
    return preds, refs, images, loaders


def model_inputs(args):
    """Model mode: caption the split with a trained VLV -> (preds, refs, images_info, loaders, vlv)."""
    vlv = common.load_vlv(args.stage1_ckpt, args.stage2_ckpt, args.device)
    common.load_enhancer(args, vlv)
    dataset = CocoImageCaptionDataset(args.data_dir, split=args.split, image_size=vlv.image_size,
                                      karpathy_json=args.karpathy_json, seed=args.seed, data_format=args.data_format)
    ids = dataset.image_ids[:args.num_samples]  # one item per image (those with captions), file order
    transform = image_transform(vlv.image_size)

    def loader(image_id):
        return lambda: transform(load_rgb(dataset.image_path(image_id)))  # raises UnreadableImage

    loaders = {i: loader(i) for i in ids}
    decoding = common.decoding_kwargs(args)

    def caption_fn(images):
        return vlv.caption(torch.stack(images).to(args.device), **decoding)

    items = [{"image_id": i, "pixel_values": (lambda i=i: read_pixels(dataset.image_path(i), transform))}
             for i in ids]
    preds = run_predictions(caption_fn, items, args.out_jsonl, args.batch_size, common.output_settings(args, vlv))
    print(f"{args.out_jsonl}: {len(preds)} predictions", file=sys.stderr)
    return preds, dataset.captions_by_image, dataset.images_info, loaders, vlv


def main(argv=None):
    args = parse_args(argv)
    vlv = None
    if args.preds_json:
        preds, refs, images_info, loaders = preds_file_inputs(args)
    else:
        preds, refs, images_info, loaders, vlv = model_inputs(args)
    ids = list(preds)
    if not ids:
        common.die("no image could be captioned; see the warnings above")

    scores = {"num_images": len(ids)}
    scores.update(score_captions(preds, refs, args.metrics, spice=args.spice))

    notes = []
    if "clip" in args.metrics:
        if not args.clip_model:
            notes.append("CLIPScore skipped: no --clip_model given (a local CLIPModel folder; nothing is "
                         "downloaded)")
        elif loaders is None:
            common.die(f"CLIPScore needs the images: no image folder {default_image_dir(args.ann_json)}; "
                       "pass --image_dir")
        else:
            try:
                scores.update(clip_scores(LazyImages([loaders[i] for i in ids]), [preds[i] for i in ids],
                                          [refs[i] for i in ids], args.clip_model, args.clip_batch_size,
                                          args.device))
            except UnreadableImage as e:
                common.die(f"CLIPScore needs every scored image: {e}; fix the file or leave out clip")
            scores["clip_scale"] = CLIP_SCALE_NOTE

    if "fid" in args.metrics:
        try:
            real = [loaders[i]() for i in ids]
        except UnreadableImage as e:
            common.die(f"FID needs every scored image: {e}; fix the file or leave out fid")
        scores.update(reconstruction_fid(vlv, real, [preds[i] for i in ids], args))

    if any((images_info.get(i) or {}).get("scene") is not None for i in ids):
        scores["attribute_accuracy"] = attribute_accuracy(preds, images_info)

    common.save_json(args.out_json, scores)
    for note in notes:
        print(note)
    print(markdown_tables(scores))
    print(f"wrote {args.out_json}", file=sys.stderr)

    n_sheet = min(args.num_sheet_images, len(ids))
    if n_sheet > 0 and loaders is not None:
        sheet_ids, images = [], []
        for i in ids[:n_sheet]:
            try:
                images.append(loaders[i]())
                sheet_ids.append(i)
            except UnreadableImage as e:
                print(f"sheet: skipped {e}", file=sys.stderr)
        regen = None
        if args.regen and vlv is not None and images:
            regen = []
            for s in range(0, len(images), args.batch_size):  # SD at full size: keep batches small
                batch = torch.stack(images[s:s + args.batch_size]).to(args.device)
                regen += list(vlv.regenerate(batch, [preds[i] for i in sheet_ids[s:s + args.batch_size]],
                                             args.num_inference_steps, args.guidance_scale, args.seed).cpu())
        if images:
            save_sheet(args.sheet, images, [preds[i] for i in sheet_ids], [refs[i][0] for i in sheet_ids], regen)
            print(f"wrote {args.sheet}", file=sys.stderr)
    elif n_sheet > 0:
        print(f"no sheet: no image folder {default_image_dir(args.ann_json)}; pass --image_dir", file=sys.stderr)
    return scores


if __name__ == "__main__":
    errors.run(main)
