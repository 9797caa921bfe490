"""One seed -> an image and its caption, through the shared latent z.

    seed --torch.Generator (CPU)--> noise --prior (flow ODE, or a Gaussian)--> z [L,D]
    z --cond--> frozen SD (DDIM from latents drawn from the same generator, guided) --> image
    z (or cond(z)) --captioner--> caption

Every random number of a sample is drawn from a CPU generator seeded with its seed (the prior's
noise first, then SD's starting latents), so a GPU and a CPU draw the same noise and a batch draws
what its seeds draw one at a time. Captions are decoded deterministically (beam search or greedy).

    from models.generator import MultimodalGenerator
    gen = MultimodalGenerator.from_run("checkpoints/toy")   # RUN/stage1, RUN/stage2, RUN/prior (or RUN/flow_prior)
    image, caption = gen.generate(seed=42)
    results = gen.generate_batch(range(100), out_dir="samples/")  # [(image, caption, meta)]; resumes
"""
import json
import os
import time

import torch
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from data.coco import to_pil
from data.files import atomic_path, save_json
from errors import BadInput

METADATA = "metadata.json"


class FlowPrior(nn.Module):
    """A flow of train_flowmatching.py --mode prior: standard noise [B,L,D] -> z, by its ODE."""

    kind = "flow"

    def __init__(self, flow, steps=16, method="heun"):
        super().__init__()
        self.flow, self.steps, self.method = flow, steps, method
        self.noise_shape = self.z_shape = tuple(flow.source_mean.shape)

    @torch.no_grad()
    def forward(self, noise):
        return self.flow.transport(noise, 0.0, self.steps, self.method)


class GaussianZPrior(nn.Module):
    """The baseline a prior run fits (models.flow.GaussianPrior): the data's mean and covariance."""

    kind = "gaussian"

    def __init__(self, gaussian):
        super().__init__()
        self.gaussian = gaussian
        self.noise_shape, self.z_shape = gaussian.noise_shape, tuple(gaussian.shape)

    @torch.no_grad()
    def forward(self, noise):
        return self.gaussian.from_noise(noise)


def seed_noise(seeds, *shapes):
    """For each shape, a [len(seeds), *shape] tensor: sample i's parts are drawn in turn from one
    CPU generator seeded with seeds[i], so they do not depend on the batch or the device."""
    out = [[] for _ in shapes]
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for parts, shape in zip(out, shapes):
            parts.append(torch.randn(shape, generator=g))
    return [torch.stack(parts) for parts in out]


def check_seeds(seeds):
    seeds = [int(s) for s in seeds]
    bad = [s for s in seeds if not 0 <= s < 2 ** 63]
    if bad:
        raise BadInput(f"seed {bad[0]}: seeds are integers in 0..2**63-1")
    return seeds


def png_bytes(image):
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class MultimodalGenerator:
    """vlv: models.vlv.VLV with a captioner; prior: FlowPrior or GaussianZPrior over its z.
    checkpoints: {"stage1"|"stage2"|"prior": {"name", "fingerprint"}} for the metadata."""

    def __init__(self, vlv, prior, num_inference_steps=50, guidance_scale=2.0, decoding=None, batch_size=16,
                 checkpoints=None):
        if vlv.captioner is None:
            raise BadInput("the generator needs a captioner: pass a stage-2 checkpoint")
        decoding = dict(decoding or {})
        if decoding.get("do_sample"):
            raise BadInput("the generator decodes captions deterministically (beam search or greedy): a sampled "
                           "caption would not be a function of the seed; leave out --do_sample")
        if batch_size < 1:
            raise BadInput(f"batch_size {batch_size}: must be at least 1")
        self.vlv, self.prior = vlv.eval(), prior.eval()
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.decoding, self.batch_size = decoding, batch_size
        self.checkpoints = checkpoints or {}
        self.device = next(vlv.parameters()).device
        self.last_times = {}  # seconds per part of the last generate_batch: prior, sd, captioner

    @classmethod
    def from_run(cls, run_dir=None, stage1=None, stage2=None, prior=None, device=None, **settings):
        """The newest checkpoints of a run folder (RUN/stage1, RUN/stage2, RUN/prior or RUN/flow_prior),
        each replaceable by an explicit file or folder; prior may also be a prior run's baseline.pt
        (the Gaussian). settings: ode_steps, solver, and __init__'s keyword arguments."""
        import common  # the checkpoint loaders live there, with the scripts' other loading code
        return common.load_generator(run_dir, stage1, stage2, prior, device, **settings)

    # ---- the settings a sample depends on (what a resumed out_dir must match) -------------------

    @property
    def settings(self):
        prior = dict(kind=self.prior.kind)
        if self.prior.kind == "flow":
            prior.update(ode_steps=self.prior.steps, solver=self.prior.method)
        return dict(prior=prior, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    decoding=self.decoding)

    def _same_settings(self, record):
        """The names of what differs between a metadata record and this generator ([] when nothing)."""
        ours = json.loads(json.dumps(self.settings))  # as JSON reads it back (tuples -> lists)
        changed = [k for k in ours if record.get(k) != ours[k]]
        theirs = {k: v.get("fingerprint") for k, v in (record.get("checkpoints") or {}).items()}
        changed += [f"the {k} checkpoint" for k, v in self.checkpoints.items() if theirs.get(k) != v.get("fingerprint")]
        return changed

    # ---- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, seeds):
        """One batch -> (images [B,3,H,W] in [0,1], captions, seconds per part)."""
        noise, latents = seed_noise(seeds, self.prior.noise_shape, self.vlv.sd.latent_shape)
        t = time.perf_counter()
        z = self.prior(noise.to(self.device))
        images, captions, times = self.decode(z, latents)
        times["prior"] = time.perf_counter() - t - sum(times.values())
        return images, captions, times

    @torch.no_grad()
    def decode(self, z, latents):
        """z [B,L,D] (a prior's, or an image's own) and SD's starting latents [B,*sd.latent_shape] ->
        (images [B,3,H,W] in [0,1], captions, seconds of SD and of the captioner)."""
        sd, times = self.vlv.sd, {}
        t = time.perf_counter()
        cond = sd.condition(z.to(self.device))
        images = sd.generate(cond, self.num_inference_steps, self.guidance_scale, latents=latents)
        times["sd"] = time.perf_counter() - t
        t = time.perf_counter()
        captions = self.vlv.captioner.generate(self.vlv.captioner_input(z, cond), **self.decoding)
        times["captioner"] = time.perf_counter() - t
        return images, captions, times

    def _metadata(self, seed, caption, image, seconds, batch):
        return dict(seed=seed, caption=caption, latent_shape=list(self.prior.z_shape), image_size=list(image.size),
                    device=str(self.device),
                    checkpoints=self.checkpoints, time_s=round(seconds, 4), batch_size=batch, **self.settings)

    def generate_with_metadata(self, seed):
        return self.generate_batch([seed], progress=False)[0]

    def generate(self, seed):
        """seed -> (PIL image, caption). The same seed gives the same PNG bytes and caption."""
        image, caption, _ = self.generate_with_metadata(seed)
        return image, caption

    def generate_batch(self, seeds, batch_size=None, progress=True, out_dir=None):
        """seeds -> [(image, caption, meta)] in their order, `batch_size` at a time (default: the
        generator's); the same outputs as one generate() per seed. With out_dir: seed_XXX.png and
        metadata.json (a list of {seed, caption, image_path, ...}) written atomically after each
        batch, and the seeds already there (with these settings) read back instead of redone."""
        seeds = check_seeds(seeds)
        batch_size = batch_size or self.batch_size
        done = self._read_out_dir(out_dir) if out_dir else {}
        todo = [s for s in dict.fromkeys(seeds) if s not in done]
        self.last_times = {"prior": 0.0, "sd": 0.0, "captioner": 0.0}
        made = {}
        bar = tqdm(total=len(todo), desc="generating", unit="pair", disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            t = time.perf_counter()
            images, captions, times = self._generate(chunk)
            seconds = (time.perf_counter() - t) / len(chunk)
            for part, s in times.items():
                self.last_times[part] += s
            for seed, x, caption in zip(chunk, images, captions):
                image = to_pil(x)
                made[seed] = (image, caption, self._metadata(seed, caption, image, seconds, len(chunk)))
            if out_dir:
                self._write_out_dir(out_dir, {s: made[s] for s in chunk}, done)
            bar.update(len(chunk))
        bar.close()
        return [made[s] if s in made else done[s] for s in seeds]

    # ---- an output folder: PNGs and metadata.json, resumable --------------------------------

    def _read_out_dir(self, out_dir):
        path = os.path.join(out_dir, METADATA)
        if not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                records = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{path} is not a generator's metadata list ({type(e).__name__}); pass a new out_dir")
        done = {}
        for record in records:
            changed = self._same_settings(record)
            if changed:
                raise BadInput(f"{out_dir} holds samples made with other settings ({', '.join(changed)}); pass a "
                               f"new out_dir, or the settings they were made with")
            image_path = os.path.join(out_dir, record["image_path"])
            if os.path.exists(image_path):  # a PNG lost since: made again
                with Image.open(image_path) as im:
                    done[record["seed"]] = (im.convert("RGB"), record["caption"], record)
        return done

    def _write_out_dir(self, out_dir, new, done):
        os.makedirs(out_dir, exist_ok=True)
        for seed, (image, caption, meta) in new.items():
            meta["image_path"] = f"seed_{seed:03d}.png"
            with atomic_path(os.path.join(out_dir, meta["image_path"]), ".tmp.png") as tmp:
                image.save(tmp)
            done[seed] = (image, caption, meta)
        # Written after the PNGs: a seed in metadata.json always has its image.
        save_json(os.path.join(out_dir, METADATA), [done[s][2] for s in sorted(done)])
