"""Joint generation (toy world): seeds -> z -> image + caption, for the flow prior, the Gaussian
baseline (the training z's mean and covariance) and real z of val images (the limit), measured.

    python -m benchmarks.generator --run checkpoints/toy          # RUN/stage1, stage2, prior (or flow_prior), data
    python -m benchmarks.generator --run checkpoints/toy --fid_weights weights-inception-2015-12-05-6726825d.pth

Columns (data/judge.py reads the drawn image back, data/toy_world.parse_caption the caption):
- valid: the caption parses as a toy scene (1 or 2 objects, every attribute named) and the judge
  reads a scene (1 or 2 objects) in the image;
- pair consistent: the judge reads the image as the scene its caption states, every attribute;
- round trip: the model's own reading agrees: the caption of E(image) states the caption's scene;
- distinct scenes among the seeds' captions, and the total-variation distance between the
  attribute distribution of the captions and that of the training scenes (mean over object count,
  colour, shape, size and position/relation);
- memorised: share of z whose nearest training z (L2) is closer than the median distance between
  two training z of the same scene.
Then the speed of generate_batch against one generate per seed, the share of its time in each
part, and a grid of the first pairs (--grid, default RUN/eval/generated_pairs.png).
"""
import argparse
import json
import os
import time
from collections import Counter

import torch

import common
import errors
from data.coco import CocoImageCaptionDataset, image_transform, load_rgb
from data.judge import judge_image
from data.toy_world import attribute_scores, canonical, parse_caption
from models.generator import MultimodalGenerator, seed_noise

ATTRIBUTES = ("objects", "colour", "shape", "size", "where")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="checkpoints/toy")
    p.add_argument("--prior", default=None, help="default: RUN/prior or RUN/flow_prior")
    p.add_argument("--num_seeds", type=int, default=200)
    p.add_argument("--speed_seeds", type=int, default=32, help="seeds timed one generate() at a time")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--ode_steps", type=int, default=16)
    p.add_argument("--solver", default="heun")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--grid", default=None, help="PNG of the first --grid_pairs flow-prior pairs")
    p.add_argument("--grid_pairs", type=int, default=16)
    p.add_argument("--fid_weights", default=None, help="also FID of the drawn images against the val images")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def valid(scene):
    objects = scene["objects"]
    named = all(o.get(k) for o in objects for k in ("colour", "shape", "size"))
    where = scene["position"] if len(objects) == 1 else scene["relation"]
    return len(objects) in (1, 2) and named and where is not None


def scene_key(scene):
    return json.dumps(canonical(scene), sort_keys=True)


def attribute_values(scene):
    """(attribute, value) of a scene, one per object for colour, shape and size."""
    out = [("objects", len(scene["objects"]))]
    for o in scene["objects"]:
        out += [(k, o[k]) for k in ("colour", "shape", "size")]
    out.append(("where", scene["position"] if len(scene["objects"]) == 1 else scene["relation"]))
    return out


def attribute_tv(scenes, reference):
    """Mean over ATTRIBUTES of the total-variation distance between the two sets' value distributions."""
    def distributions(group):
        counts = {a: Counter() for a in ATTRIBUTES}
        for s in group:
            for a, v in attribute_values(s):
                counts[a][v] += 1
        return {a: {v: n / max(sum(c.values()), 1) for v, n in c.items()} for a, c in counts.items()}
    p, q = distributions(scenes), distributions(reference)
    return sum(0.5 * sum(abs(p[a].get(v, 0) - q[a].get(v, 0)) for v in set(p[a]) | set(q[a]))
               for a in ATTRIBUTES) / len(ATTRIBUTES)


def same_scene_distance(z, scenes, max_pairs=5000):
    """Median L2 distance between training z of the same scene (consecutive members of each scene);
    None when no two training images share one (a tiny world)."""
    groups = {}
    for row, s in enumerate(scenes):
        groups.setdefault(scene_key(s), []).append(row)
    pairs = [(g[k], g[k + 1]) for g in groups.values() for k in range(len(g) - 1)][:max_pairs]
    if not pairs:
        return None
    a, b = (torch.tensor(x) for x in zip(*pairs))
    return (z[a] - z[b]).flatten(1).norm(dim=1).median().item()


def nearest_distance(z, train_z, chunk=256):
    """For each z, the L2 distance to its nearest training z."""
    flat = train_z.flatten(1)
    return torch.cat([torch.cdist(z[s:s + chunk].flatten(1).float(), flat).min(1).values
                      for s in range(0, len(z), chunk)])


def recaption(gen, images, batch_size):
    """The model's own reading of drawn images: E(image) -> z' -> caption(z')."""
    transform = image_transform(gen.vlv.image_size)
    out = []
    for s in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[s:s + batch_size]]).to(gen.device)
        out += gen.vlv.caption(batch, **gen.decoding)
    return out


def score(images, captions, z, train, threshold, recaptions):
    scenes = [parse_caption(c) for c in captions]
    judged = [judge_image(common.to_pil(im)) for im in images]
    ok = [valid(s) for s in scenes]
    good = [s for s, v in zip(scenes, ok) if v]
    consistent = [v and attribute_scores(j, s)["all"] for v, j, s in zip(ok, judged, scenes)]
    round_trip = [v and attribute_scores(parse_caption(r), s)["all"] for v, r, s in zip(ok, recaptions, scenes)]
    memorised = None if threshold is None else (nearest_distance(z, train["z"]) < threshold).float().mean().item()
    n = len(captions)
    return dict(n=n, valid=sum(v and valid(j) for v, j in zip(ok, judged)) / n, consistent=sum(consistent) / n,
                round_trip=sum(round_trip) / n,
                distinct=len({scene_key(s) for s in good}), tv=attribute_tv(good, train["scenes"]) if good else 1.0,
                memorised=memorised)


def training_z(gen, prior_dir, data_dir):
    """The training z the prior learnt from (its run's features.safetensors) and their scenes."""
    from safetensors.torch import load_file
    path = os.path.join(prior_dir, "features.safetensors")
    if not os.path.isfile(path):
        common.die(f"{path} is missing: the memorisation column reads the prior's training z (train_flowmatching.py "
                   f"writes it); pass the prior's own --output_dir")
    feats = load_file(path)
    dataset = CocoImageCaptionDataset(data_dir, split="train", image_size=gen.vlv.image_size)
    ids = [dataset.image_ids[p] for p in feats["position"].tolist()]
    return dict(z=feats["z"].float(), scenes=[dataset.images_info[i]["scene"] for i in ids])


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    prior_dir = args.prior or common.prior_path(args.run)
    settings = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    decoding=dict(num_beams=args.num_beams), batch_size=args.batch_size)
    flow_gen = common.load_generator(args.run, prior=prior_dir, device=args.device, ode_steps=args.ode_steps,
                                     solver=args.solver, **settings)
    vlv = flow_gen.vlv
    gaussian, _ = common.load_prior(os.path.join(prior_dir, "baseline.pt"), vlv)
    gaussian_gen = MultimodalGenerator(vlv, gaussian.to(args.device), **settings)
    train = training_z(flow_gen, prior_dir, os.path.join(args.run, "data"))
    threshold = same_scene_distance(train["z"], train["scenes"])

    seeds = list(range(args.num_seeds))
    rows, drawn = [], {}
    for name, gen in (("flow prior", flow_gen), ("Gaussian (mean, covariance)", gaussian_gen)):
        t = time.perf_counter()
        results = gen.generate_batch(seeds, progress=False)
        seconds = time.perf_counter() - t
        noise, = seed_noise(seeds, gen.prior.noise_shape)  # the same draws as generate_batch made first
        z = torch.cat([gen.prior(noise[s:s + args.batch_size].to(args.device)).cpu()
                       for s in range(0, len(seeds), args.batch_size)])
        images = [image for image, _, _ in results]
        drawn[name] = (images, [c for _, c, _ in results])
        rows.append((name, score(images, drawn[name][1], z, train, threshold, recaption(gen, images, args.batch_size)),
                     seconds, dict(gen.last_times)))

    dataset = CocoImageCaptionDataset(os.path.join(args.run, "data"), split="val", image_size=vlv.image_size)
    transform = image_transform(vlv.image_size)
    real = [transform(load_rgb(dataset.image_path(i))) for i in dataset.image_ids[:args.num_seeds]]
    z = torch.cat([vlv.encoder(torch.stack(real[s:s + args.batch_size]).to(args.device)).cpu()
                   for s in range(0, len(real), args.batch_size)])
    latents = seed_noise(seeds[:len(real)], vlv.sd.latent_shape)[0]
    images, captions = [], []
    for s in range(0, len(real), args.batch_size):
        x, c, _ = flow_gen.decode(z[s:s + args.batch_size], latents[s:s + args.batch_size])
        images += [common.to_pil(im) for im in x]
        captions += c
    rows.append(("real z of val images", score(images, captions, z, train, threshold,
                                               recaption(flow_gen, images, args.batch_size)), None, None))

    speed_seeds = seeds[:args.speed_seeds]
    t = time.perf_counter()
    for seed in speed_seeds:
        flow_gen.generate(seed)
    one_rate = len(speed_seeds) / (time.perf_counter() - t)
    batch_rate = len(seeds) / rows[0][2]

    grid = args.grid or os.path.join(args.run, "eval", "generated_pairs.png")
    os.makedirs(os.path.dirname(os.path.abspath(grid)), exist_ok=True)
    flow_images, flow_captions = drawn["flow prior"]
    common.save_grid(grid, flow_images[:args.grid_pairs], ncol=8, tile=96,
                     captions=[f"{s}: {c}" for s, c in zip(seeds, flow_captions[:args.grid_pairs])])

    fids = {}
    if args.fid_weights:
        import eval_captioning
        eval_captioning.check_fid_weights(args.fid_weights)
        from torchvision.transforms.functional import to_tensor
        fids = eval_captioning.fid(real, {name: [to_tensor(im) for im in drawn[name][0]] for name in drawn},
                                   args.fid_weights, device=args.device)

    print(common.machine_description())
    memorised = ("n/a: no two training images share a scene" if threshold is None else
                 f"nearest training z closer than {threshold:.3f} (median same-scene distance of {len(train['z'])} "
                 f"training z)")
    print(f"{args.num_seeds} seeds; prior: {args.ode_steps} {args.solver} steps; SD {args.num_inference_steps} DDIM "
          f"steps, guidance {args.guidance_scale}; captions: beam {args.num_beams}; memorised: {memorised}")
    header = ["z from", "n", "valid", "pair consistent", "round trip", "distinct scenes", "attribute TV to train",
              "memorised"]
    if fids:
        header.append("FID to val images")
    table = []
    for name, r, _, _ in rows:
        row = [name, r["n"], f"{r['valid']:.3f}", f"{r['consistent']:.3f}", f"{r['round_trip']:.3f}", r["distinct"],
               f"{r['tv']:.3f}",
               "n/a" if r["memorised"] is None else f"{r['memorised']:.3f}"]
        if fids:
            row.append(f"{fids[name]:.2f}" if name in fids else "(the reference)")
        table.append(row)
    print(common.markdown_table(header, table))
    print()
    times = rows[0][3]
    total = sum(times.values())
    print(common.markdown_table(
        ["flow prior", "pairs/s", "against one generate() per seed", "prior", "SD", "captioner"],
        [[f"generate_batch (batch {args.batch_size}, {args.num_seeds} seeds)", f"{batch_rate:.2f}",
          f"{batch_rate / one_rate:.1f}x", *(f"{times[k] / total:.0%}" for k in ("prior", "sd", "captioner"))],
         [f"one generate() per seed ({len(speed_seeds)} seeds)", f"{one_rate:.2f}", "1.0x", "", "", ""]]))
    print(f"\ngrid of the first {min(args.grid_pairs, len(flow_images))} pairs: {grid}")
    return {name: r for name, r, _, _ in rows} | {"speedup": batch_rate / one_rate, "fid": fids}


if __name__ == "__main__":
    errors.run(main)
