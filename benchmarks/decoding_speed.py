"""Decoding speed: captions per second of the batched, KV-cached `generate` against a batch-1,
cache-free beam search (the EVCap / ClipCap style) and, for the LM captioners, against transformers'
`generate` alone (which runs the prompt once per beam); same beams, same captions, one run.

    python -m benchmarks.decoding_speed --stage1_ckpt checkpoints/toy/stage1 \
        --stage2_ckpt checkpoints/toy/stage2 --data_dir checkpoints/toy/data
"""
import argparse
import statistics
import time

import torch

import common
import errors
from data.coco import CocoImagesOnlyDataset


@torch.no_grad()
def beam_search_reference(captioner, z, num_beams, max_new_tokens):
    """Hand-written beam search, one image at a time and without a KV cache (every step re-runs the
    LM over the whole prefix + beam), as EVCap/ClipCap decode. It exists ONLY as the speed baseline
    of this benchmark; use EmbToCaption.generate everywhere else.

    It follows transformers' beam search (early_stopping=False, length_penalty=1.0, one EOS id): the
    2*num_beams best continuations of all beams are ranked; those among the top num_beams that end
    in EOS (or reach max_new_tokens) become finished hypotheses scored sum(logp) / length, the
    others continue; the search stops when no running beam can beat the worst of num_beams finished
    hypotheses, or at max_new_tokens. The best finished hypothesis is returned.
    """
    was_training = captioner.training
    captioner.eval()
    NEG, length_penalty = -1.0e9, 1.0
    beams_to_keep = 2 * num_beams
    captions = []
    try:
        for b in range(z.shape[0]):
            prefix = captioner.prefix_embeds(z[b:b + 1])                     # [1,P,H]
            running = torch.zeros((num_beams, 0), dtype=torch.long, device=z.device)
            running_scores = torch.full((num_beams,), NEG, device=z.device)
            running_scores[0] = 0.0     # only beam 0 is live at first, so the beams do not start identical
            finished = [running[0]] * num_beams
            finished_scores = torch.full((num_beams,), NEG, device=z.device)
            is_finished = torch.zeros(num_beams, dtype=torch.bool, device=z.device)
            can_improve = True
            for t in range(max_new_tokens):
                embeds = torch.cat([prefix.expand(num_beams, -1, -1), captioner.embed_tokens(running)], dim=1)
                logits = captioner.lm(inputs_embeds=embeds, use_cache=False).logits[:, -1, :].float()
                log_probs = torch.log_softmax(logits, dim=-1) + running_scores[:, None]   # [nb,V]
                vocab = log_probs.shape[-1]
                top_scores, top_idx = torch.topk(log_probs.reshape(-1), k=beams_to_keep)
                cand = torch.cat([running[top_idx // vocab], (top_idx % vocab)[:, None]], dim=1)  # [K,t+1]
                ends = (cand[:, -1] == captioner.eos_id) | (t + 1 >= max_new_tokens)

                # Beams that go on: the best num_beams candidates that did not end.
                keep = torch.topk(top_scores + ends.float() * NEG, k=num_beams).indices
                running, running_scores = cand[keep], (top_scores + ends.float() * NEG)[keep]

                # Finished hypotheses: only candidates ranked in the top num_beams may finish.
                rank_ok = torch.arange(beams_to_keep, device=z.device) < num_beams
                just_finished = ends & rank_ok
                scores = top_scores / ((t + 1) ** length_penalty)
                if not can_improve:
                    scores = scores + NEG
                scores = scores + (~just_finished).float() * NEG
                merged_scores = torch.cat([finished_scores, scores])
                merged_flags = torch.cat([is_finished, just_finished])
                best = torch.topk(merged_scores, k=num_beams).indices
                merged = finished + list(cand)
                finished = [merged[i] for i in best.tolist()]
                finished_scores, is_finished = merged_scores[best], merged_flags[best]

                # Can the best running beam still beat the worst finished one?
                best_running = running_scores[0] / ((t + 1) ** length_penalty)
                worst = torch.where(is_finished, finished_scores.min(), torch.tensor(NEG, device=z.device))
                can_improve = can_improve and bool((best_running > worst).any())
                if not can_improve or bool(ends.all()):
                    break
            captions.append(finished[0].tolist())
    finally:
        captioner.train(was_training)
    return captioner.decode(captions)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1_ckpt", required=True, help="vision_encoder_{step}.pt, or the stage-1 run's folder")
    p.add_argument("--stage2_ckpt", required=True, help="captioner_{step}.pt, or the stage-2 run's folder")
    p.add_argument("--data_dir", default="checkpoints/toy/data")
    p.add_argument("--split", default="val")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32, help="images per generate() call")
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=20)
    p.add_argument("--turns", type=int, default=3, help="timed runs of every decoder; the table reads the medians")
    args = p.parse_args(argv)
    if min(args.num_images, args.batch_size, args.num_beams, args.max_new_tokens, args.turns) < 1:
        common.die("--num_images, --batch_size, --num_beams, --max_new_tokens and --turns must be 1 or more")

    vlv = common.load_vlv(args.stage1_ckpt, args.stage2_ckpt, "cpu")
    data = CocoImagesOnlyDataset(args.data_dir, split=args.split, image_size=vlv.image_size)
    items = [x for x in (data[i] for i in range(min(args.num_images, len(data)))) if x is not None]
    images = torch.stack([x["pixel_values"] for x in items])
    with torch.no_grad():
        prefix = torch.cat([vlv.prefix(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size)])
    n = len(prefix)
    decoding = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, length_penalty=1.0)

    def batched_captions(prefix):
        return [c for i in range(0, len(prefix), args.batch_size)
                for c in vlv.captioner.generate(prefix[i:i + args.batch_size], **decoding)]

    def library_captions(prefix):
        # transformers' generate() given the prompt's embeddings alone: it runs the prompt once per beam
        c = vlv.captioner
        out = []
        for i in range(0, len(prefix), args.batch_size):
            embeds = c.prefix_embeds(prefix[i:i + args.batch_size])
            out += c.decode(c.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(
                embeds.shape[:2], dtype=torch.long), **c.generation_kwargs(**decoding)))
        return out

    def reference_captions(prefix):
        if vlv.captioner.kind == "blip":  # its decoder is no causal LM over inputs_embeds: generate() without a cache
            return [c for i in range(len(prefix)) for c in vlv.captioner.generate(prefix[i:i + 1], use_cache=False,
                                                                                   **decoding)]
        # prefix and EVCap: the hand-written batch-1 search over the same prefix embeddings
        return [c for i in range(len(prefix))
                for c in beam_search_reference(vlv.captioner, prefix[i:i + 1], args.num_beams, args.max_new_tokens)]

    # Warm-up, untimed: the first generate() of a process pays one-off costs (lazy imports, the generation
    # config's checks, allocator growth) that would otherwise land on whichever decoder runs first, all
    # of it when the images fit one batch.
    batched_captions(prefix[:2])
    reference_captions(prefix[:1])
    if vlv.captioner.kind != "blip":
        library_captions(prefix[:2])

    # Turns, each timing every decoder once, in the same order; the table reads the medians, so a
    # burst of load on a shared machine lands in one turn of every decoder, not in one decoder.
    decoders = {"reference": reference_captions, "batched": batched_captions}
    if vlv.captioner.kind != "blip":  # BLIP's prompt is tokens, which generate() already runs as given
        decoders["library"] = library_captions
    seconds, captions = {name: [] for name in decoders}, {}
    for _ in range(args.turns):
        for name, decode in decoders.items():
            start = time.perf_counter()
            captions[name] = decode(prefix)
            seconds[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(ts) for name, ts in seconds.items()}
    batched, reference = captions["batched"], captions["reference"]
    t_batched, t_reference = seconds["batched"], seconds["reference"]

    same = sum(a == b for a, b in zip(batched, reference))
    rows = [["batch-1 beam search, no KV cache (EVCap/ClipCap style)", f"{n / t_reference:.1f}", f"{same}/{n}"]]
    if "library" in decoders:
        t_library = seconds["library"]
        rows.append([f"transformers generate, batch {args.batch_size}, KV cache, the prompt run once a beam",
                     f"{n / t_library:.1f}", f"{sum(a == b for a, b in zip(captions['library'], reference))}/{n}"])
    rows.append([f"generate(), batch {args.batch_size}, KV cache, the prompt run once an image and shared by its beams (this codebase)",
                 f"{n / t_batched:.1f}", f"{same}/{n}"])
    print(common.machine_description())
    print(f"{n} toy {args.split} images, {vlv.captioner.kind} captioner, {args.num_beams} beams, at most "
          f"{args.max_new_tokens} new tokens; captions/s: the median of {args.turns} turns")
    print(common.markdown_table(["decoder", "captions/s", "same captions"], rows))
    print(f"speed-up: {t_reference / t_batched:.1f}x"
          + (f" ({t_library / t_batched:.2f}x transformers' generate alone)" if "library" in decoders else ""))
    return dict(num_images=n, same=same, batched=batched, reference=reference, seconds=seconds)


if __name__ == "__main__":
    errors.run(main)
