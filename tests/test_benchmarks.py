"""Every benchmark through its real `main`, one tiny step each, on tiny fixtures laid out like a
toy pipeline's OUT (data/, teacher/, lm/, stage1/, stage2/): the table it prints has its header and
rows, and where it is cheap a value that cannot be wrong. Timings are never asserted."""
import os
import subprocess
import sys

import pytest

import common
import train_stage1
import train_stage2
from benchmarks import (decoding_speed, heldout_probe, reference_scoring, stage1_latent_cache, stage1_precision,
                        stage2_step, teacher_guidance, teacher_step, timing, z_carries)
from conftest import argv_of, reset_accelerator_state, save_tiny_gpt2
from data import toy_world
from errors import BadInput


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sd_dir):
    """A toy pipeline's OUT in miniature: a 16+6 image toy world, the tiny SD as the teacher, a tiny
    GPT-2 as the LM, and a 2-step stage 1 and stage 2 on them (fp32). Stage 1 reads the toy world's
    32 px, so the judge reads its images as they are."""
    root = tmp_path_factory.mktemp("bench_run")
    toy_world.generate(str(root / "data"), num_train=16, num_val=6, seed=0)
    os.symlink(tiny_sd_dir, root / "teacher")
    save_tiny_gpt2(root / "lm")
    reset_accelerator_state()
    train_stage1.main(argv_of(data_dir=root / "data", sd_model_id=root / "teacher", output_dir=root / "stage1",
                              image_size=32, backbone="toy", backbone_weights="none", encoder_width=32,
                              encoder_layers=1, batch_size=4, max_steps=2, validation_steps=0,
                              num_validation_images=1, num_inference_steps=1, num_workers=0, mixed_precision="no"))
    reset_accelerator_state()
    train_stage2.main(argv_of(stage1_ckpt=root / "stage1", data_dir=root / "data", llm=root / "lm",
                              output_dir=root / "stage2", batch_size=4, lr=1e-3, lr_warmup_steps=1, max_steps=2,
                              checkpointing_steps=2, validation_steps=0, num_validation_images=1, max_new_tokens=8,
                              num_workers=0, mixed_precision="no"))
    return {part: str(root / part) for part in ("data", "teacher", "lm", "stage1", "stage2")} | {"root": str(root)}


def tables(text):
    """The markdown tables in printed text -> [[header cells], [row cells], ...] per table."""
    found, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= {"-"} and c for c in cells):
                continue  # the separator line
            if current is None:
                current = []
                found.append(current)
            current.append(cells)
        else:
            current = None
    return found


def assert_machine_line(out):
    assert out.count(common.machine_description()) == 1


def test_timing_print_medians(capsys):
    medians = timing.print_medians("title", {"a": [2.0, 1.0, 3.0], "b": [1.0]})
    out = capsys.readouterr().out
    assert medians == {"a": 2.0, "b": 1.0}
    assert tables(out) == [[["setting", "s/step", "against a"], ["a", "2.000", "1.00x"], ["b", "1.000", "2.00x"]]]


def test_decoding_speed(run, capsys):
    result = decoding_speed.main(argv_of(stage1_ckpt=run["stage1"], stage2_ckpt=run["stage2"], data_dir=run["data"],
                                         num_images=3, batch_size=2, num_beams=2, max_new_tokens=5, turns=2))
    out = capsys.readouterr().out
    assert_machine_line(out)
    assert "captions/s: the median of 2 turns" in out
    (table,) = tables(out)
    assert table[0] == ["decoder", "captions/s", "same captions"]
    assert [row[0] for row in table[1:]] == [
        "batch-1 beam search, no KV cache (EVCap/ClipCap style)",
        "transformers generate, batch 2, KV cache, the prompt run once a beam",
        "generate(), batch 2, KV cache, the prompt run once an image and shared by its beams (this codebase)"]
    # the reference beam search is transformers' beam search (tests/test_emb_to_caption.py checks it
    # on trained captioners): the same captions, every one
    assert [row[2] for row in table[1:]] == ["3/3", "3/3", "3/3"]
    assert result["batched"] == result["reference"]
    assert set(result["seconds"]) == {"reference", "library", "batched"}


def test_heldout_probe(run, capsys):
    results = heldout_probe.main(argv_of(stage1_ckpt=run["stage1"], stage2_ckpt=f"distilled={run['stage2']}",
                                         train_dir=run["data"], val_dir=run["data"], probe_steps=2))
    out = capsys.readouterr().out
    assert_machine_line(out)
    (table,) = tables(out)
    assert table[0] == ["representation", "shape: seen val", "shape: held-out val", "colour: seen val",
                        "colour: held-out val"]
    assert [row[0] for row in table[1:]] == ["stage-1 z", "stage-1 cond(z)", "stage-2 prefix (distilled)"]
    assert list(results) == ["stage-1 z", "stage-1 cond(z)", "stage-2 prefix (distilled)"]


def test_heldout_probe_wants_name_equals_path(run):
    with pytest.raises(common.BadInput, match="NAME=PATH"):
        heldout_probe.main(argv_of(stage1_ckpt=run["stage1"], stage2_ckpt=run["stage2"]))


def test_reference_scoring(run, capsys):
    result = reference_scoring.main(argv_of(stage1_ckpt=run["stage1"], stage2_ckpt=run["stage2"],
                                            data_dir=run["data"], batch_size=2, num_batches=2))
    out = capsys.readouterr().out
    assert_machine_line(out)
    (table,) = tables(out)
    assert table[0] == ["scoring every reference", "ms per batch", "same picks", "max score difference"]
    assert [row[0] for row in table[1:]] == ["one copy of the prefix per reference",
                                             "the prefix once per image, KV cache shared"]
    # 2 x 2 distinct images of the toy world, 5 references each; the same scores up to rounding
    assert result["num_references"] == 2 * 2 * toy_world.CAPTIONS_PER_IMAGE
    assert table[2][2] == "2/2" and result["max_difference"] < 1e-3


def test_stage1_latent_cache(run, capsys):
    result = stage1_latent_cache.main(argv_of(data_dir=run["data"], sd_model_id=run["teacher"], subset_ratio=0.5,
                                              batch_size=4, image_size=16, mixed_precision="no"))
    out = capsys.readouterr().out
    assert_machine_line(out)
    (table,) = tables(out)
    assert table[0] == ["latent cache", "epoch 1 (s/step)", "epoch 2 (s/step)"]
    assert [row[0] for row in table[1:]] == ["off", "on"]
    assert result["mixed_precision"] == "no"


def test_stage1_precision(run, capsys):
    result = stage1_precision.main(argv_of(sd_model_id=run["teacher"], rounds=1, steps=1, batch_size=2,
                                           image_size=16))
    out = capsys.readouterr().out
    assert_machine_line(out)
    (table,) = tables(out)
    assert table[0] == ["setting", "s/step", "against fp32"]
    assert [row[0] for row in table[1:]] == list(stage1_precision.SETTINGS)
    assert table[1][2] == "1.00x"
    assert f"--mixed_precision auto on this machine's CPU: {result['auto']}" in out


def test_stage2_step(run, capsys):
    result = stage2_step.main(argv_of(run=run["root"], rounds=1, steps=1, batch_size=4, num_workers=0))
    out = capsys.readouterr().out
    assert_machine_line(out)
    (table,) = tables(out)
    assert table[0] == ["setting", "s/step", "against fp32"]
    assert [row[0] for row in table[1:]] == ["fp32", "bf16"]
    assert table[1][2] == "1.00x"
    assert f"--mixed_precision auto on this machine: {result['auto']}" in out


def test_stage2_step_of_blip_in_the_settings_asked(run, capsys):
    stage2_step.main(argv_of(run=run["root"], rounds=1, steps=1, batch_size=2, num_workers=0, captioner="blip",
                             settings="fp32"))
    out = capsys.readouterr().out
    assert "toy stage-2 step, blip captioner (batch 2, posterior_ref" in out
    (table,) = tables(out)
    assert [row[0] for row in table[1:]] == ["fp32"]
    with pytest.raises(BadInput, match=r"^--settings fp32,fp16: unknown fp16; use some of fp32,bf16$"):
        stage2_step.main(argv_of(run=run["root"], settings="fp32,fp16"))


def test_stage2_step_wants_a_pipeline_run(tmp_path):
    """As a user runs it, from the repository root: one line and status 2, no traceback."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.stage2_step", "--run", str(tmp_path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --run {tmp_path} has no data/")


def test_teacher_guidance(run, capsys):
    results = teacher_guidance.main(argv_of(teacher=run["teacher"], data_dir=run["data"], guidance_scales="1.5,3",
                                            num_inference_steps=1, num_samples_eval=2, image_size=16))
    out = capsys.readouterr().out
    assert_machine_line(out)
    found = tables(out)
    assert [t[0][0] for t in found] == ["guidance 1.5", "guidance 3"]
    for table, groups in zip(found, results.values()):
        assert sum(groups[g]["num_images"] for g in ("seen", "heldout")) == 2
        assert [row[0] for row in table[1:]][:3] == ["colour", "shape", "size"] and table[-1][0] == "all"


def test_teacher_step(capsys):
    result = teacher_step.main(argv_of(batch_size=2, vae_batch_size=2, steps=1, rounds=1))
    out = capsys.readouterr().out
    assert_machine_line(out)
    unet, vae = tables(out)
    assert unet[0] == ["precision", "attention", "s per training step"]
    assert [row[0] for row in unet[1:]] == ["fp32", "fp32", "bf16 autocast", "bf16 autocast", "bf16 autocast"]
    assert vae[0] == ["precision", "s per training step"]
    assert [row[0] for row in vae[1:]] == ["fp32", "bf16 autocast"]
    assert f"--mixed_precision auto on this machine's CPU: {result['auto']}" in out
    # the pipeline's teacher, not the script's larger default UNet
    assert f"({sum(p.numel() for p in teacher_unet().parameters()) / 1e6:.1f}M parameters)" in out


def teacher_unet():
    from models.toy_teacher import build_unet
    from scripts.train_toy_teacher import ints
    channels = ints(common.PRESETS["toy"]["teacher"]["unet_channels"])
    return build_unet(latent_channels=8, latent_size=8, channels=channels)


def test_z_carries(run, capsys):
    results = z_carries.main(argv_of(stage1_ckpt=run["stage1"], data_dir=run["data"], num_images=3, batch_size=2,
                                     num_inference_steps=1))
    out = capsys.readouterr().out
    assert_machine_line(out)
    found = tables(out)
    assert [t[0][0] for t in found] == ["original image", "from z (stage 1)", "from the caption"]
    # the judge reads the toy world's own renders exactly
    original = results["original image"]["overall"]
    assert original["num_images"] == 3 and original["all"]["correct"] == 3


def test_flow_step(capsys):
    from benchmarks import flow_step
    times = flow_step.main(argv_of(batch_size=4, seq_len=4, dim=8, width=8, depth=1, steps=1, turns=1))
    out = capsys.readouterr().out
    assert_machine_line(out)
    assert "this project (models.flow)" in times
    assert tables(out)[0][0] == ["setting", "s/step", "against this project (models.flow)"]


@pytest.fixture(scope="module")
def flows(run):
    import train_flowmatching
    for mode in ("degrade", "prior"):
        reset_accelerator_state()
        train_flowmatching.main(argv_of(stage1_ckpt=run["stage1"], data_dir=run["data"], mode=mode,
                                        output_dir=os.path.join(run["root"], f"flow_{mode}"), width=16, depth=1,
                                        heads=2, batch_size=4, max_steps=2, lr_warmup_steps=1, validation_steps=0,
                                        degraded_copies=1, feature_batch_size=8, mixed_precision="no"))
    return run


def test_enhance_degrade(flows, capsys):
    from benchmarks import enhance_degrade
    rows = enhance_degrade.main(argv_of(run=flows["root"], num_samples=4, enhancer_steps=1, num_beams=1))
    out = capsys.readouterr().out
    assert_machine_line(out)
    accuracy, cosines, cost = tables(out)
    assert accuracy[0] == ["val images", "no enhancer", "ridge map", "flow", "ridge won back", "flow won back"]
    assert cosines[1][:2] == ["clean", "1.0000"]  # clean z against itself
    assert [r[0] for r in accuracy[1:]] == ["clean", "noise", "blur", "jpeg", "downscale",
                                        "mean of the corruptions (won back: mean of the rows' shares)",
                                        "won back of the mean loss"]
    assert set(rows["clean"]) == {"none", "ridge", "flow"} and [r[0] for r in cost[1:]] == ["none", "ridge", "flow"]
    # a fresh val split, generated once beside the run
    enhance_degrade.main(argv_of(run=flows["root"], val_world=8, enhancer_steps=1, num_beams=1))
    assert "on 8 toy val images" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(flows["root"], "val_world_8", "annotations", "captions_val2017.json"))


def test_generator(flows, fid_weights, tmp_path, capsys):
    from benchmarks import generator
    grid = str(tmp_path / "pairs.png")
    rows = generator.main(argv_of(run=flows["root"], num_seeds=4, speed_seeds=2, batch_size=3, ode_steps=1,
                                  num_inference_steps=1, num_beams=1, grid=grid, grid_pairs=3, fid_weights=fid_weights))
    out = capsys.readouterr().out
    assert_machine_line(out)
    quality, speed = tables(out)
    assert quality[0] == ["z from", "n", "valid", "pair consistent", "round trip", "distinct scenes",
                          "attribute TV to train", "memorised", "FID to val images"]
    assert [r[0] for r in quality[1:]] == ["flow prior", "Gaussian (mean, covariance)", "real z of val images"]
    assert all(r[1] == "4" and 0 <= float(r[3]) <= 1 and 0 <= float(r[4]) <= 1 and 0 <= float(r[6]) <= 1
               for r in quality[1:])
    assert quality[3][8] == "(the reference)" and float(quality[1][8]) > 0
    assert [r[0] for r in speed[1:]] == ["generate_batch (batch 3, 4 seeds)", "one generate() per seed (2 seeds)"]
    assert rows["speedup"] > 0 and os.path.getsize(grid) > 0
    # the judge of a toy scene against its own caption: consistent with itself, TV 0 to itself
    scene = {"objects": [{"colour": "red", "shape": "circle", "size": "small"}], "position": "left", "relation": None}
    assert generator.valid(scene) and generator.attribute_tv([scene], [scene]) == 0.0


def test_bridge_step(capsys):
    from benchmarks import bridge_step
    rows, speed = bridge_step.main(argv_of(steps=1, batch_size=2, inference_batch_size=2, shapes="toy"))
    out = capsys.readouterr().out
    assert_machine_line(out)
    train, inference = tables(out)
    assert train[0][1:] == ["ours ms/step", "GaussianDiffusion1D + Trainer1D ms/step", "ours is faster by"]
    assert [r[0] for r in rows] == [r[0] for r in speed] == ["toy [16, 64]"]
    assert float(speed[0][3].rstrip("x")) > 1  # 600 UNet calls cost more than 5


def test_zero_shot(run, capsys):
    import train_diffusion_bridge
    import train_flowmatching
    from benchmarks import zero_shot
    root = run["root"]
    common_args = dict(stage1_ckpt=run["stage1"], data_dir=run["data"], batch_size=4, lr_warmup_steps=1, max_steps=2,
                       validation_steps=0, mixed_precision="no")
    reset_accelerator_state()
    train_diffusion_bridge.main(argv_of(output_dir=os.path.join(root, "bridge"), unet_dim=8, dim_mults="1,2",
                                        feature_batch_size=8, val_split="none", **common_args))
    reset_accelerator_state()
    train_flowmatching.main(argv_of(output_dir=os.path.join(root, "flow_v2t"), mode="visual2text", width=16, depth=1,
                                    heads=2, feature_batch_size=8, **common_args))
    for name, flags in (("text_raw", dict(text_norm="none")), ("text_centre", dict(bridge_ckpt=os.path.join(root, "bridge"))),
                        ("text_bridge", dict(bridge_ckpt=os.path.join(root, "bridge"), bridge_aug_t0=400,
                                             bridge_aug_steps=1))):
        reset_accelerator_state()
        train_stage2.main(argv_of(text_only=True, llm=run["lm"], output_dir=os.path.join(root, "zero_shot", name),
                                  num_validation_images=1, max_new_tokens=8, num_workers=0, **flags, **common_args))
    capsys.readouterr()
    zero_shot.main(["--run", root, "--noise_std", "center"])
    assert 0 < float(capsys.readouterr().out) < float("inf")  # the std whose cos matches the measured gap
    results = zero_shot.main(argv_of(run=root, num_samples=4, num_beams=1,
                                     rows="none,c3,ridge,flow,bridge,paired"))
    out = capsys.readouterr().out
    assert_machine_line(out)
    table = tables(out)[0]
    assert table[0][0] == "way of closing the gap" and len(table) == 1 + len(results) == 1 + 6
    assert all(-1 <= r["cos"] <= 1 and 0 <= r["seen"] <= 1 for r in results)
    with pytest.raises(BadInput, match="run scripts/zero_shot.sh first"):
        zero_shot.main(argv_of(run=root, rows="capdec"))


def test_memory_plan(capsys):
    from benchmarks import memory_plan
    plan = memory_plan.main([])
    out = capsys.readouterr().out
    assert_machine_line(out)
    memory, hours = tables(out)
    assert [r[0] for r in memory[1:]] == list(plan) and len(plan) == 4
    stage2 = plan["stage 2 (Qwen/Qwen2.5-3B fully fine-tuned)"]
    assert 3.0e9 < stage2["plain"]["trainable"] < 3.2e9  # Qwen2.5-3B, tied embeddings counted once
    assert stage2["weights"] > 45 * 2 ** 30 > stage2["sharded"] * 5  # the issue's ~48 GB of fp32 Adam training
    for p in plan.values():
        assert 0 < p["checkpointed"]["per_sample"] < p["plain"]["per_sample"]
        assert p["checkpointed"]["flops"] > p["plain"]["flops"]  # the recompute
        b = p["batches"]
        assert b["ddp", "ckpt"] >= b["ddp", "plain"] and b["fsdp", "plain"] >= b["ddp", "plain"]
    assert stage2["batches"]["ddp", "plain"] < stage2["batches"]["fsdp", "ckpt"]


def test_memory_plan_meta_counts_what_a_cpu_run_saves():
    """The plan's method: saved-for-backward bytes and FLOPs on the meta device are a real CPU run's,
    to the attention kernel (CPU and meta pick different ones: 0.5% of the bytes, 3% of the FLOPs here)."""
    import torch

    from benchmarks.memory_plan import measure
    from models.flow import Flow
    results = []
    for device in ("cpu", "meta"):
        zero, one = torch.zeros(4, 8, device=device), torch.ones(4, 8, device=device)
        with torch.device(device):
            torch.manual_seed(0)
            flow = Flow(dict(seq_len=4, dim=8, width=16, depth=2, heads=2), zero, one, zero, one)

        def step(batch):
            x = torch.randn(batch, 4, 8, device=device)
            return flow(x, x, torch.rand(batch, device=device))
        results.append(measure(flow, step))
    (cpu_static, cpu_bytes, cpu_flops), (meta_static, meta_bytes, meta_flops) = results
    assert cpu_bytes > 0 and abs(meta_bytes - cpu_bytes) < 0.02 * cpu_bytes and cpu_static == meta_static
    assert abs(meta_flops - cpu_flops) < 0.05 * cpu_flops


def test_gpu_step_runs_its_code_on_tiny_configs(capsys):
    from benchmarks import gpu_step
    results = gpu_step.main(["--device", "cpu", "--sizes", "tiny", "--stage1_batch", "2", "--stage2_batch", "2",
                             "--steps", "1", "--precisions", "bf16"])
    out = capsys.readouterr().out
    assert_machine_line(out)
    table = tables(out)[0]
    assert table[0] == ["stage", "batch", "checkpointing", "precision", "peak GiB (measured)",
                        "plan GiB (memory_plan)", "s/step"]
    assert [(r[0], r[2]) for r in table[1:]] == [("stage 1", "off"), ("stage 1", "on"), ("stage 2", "off"),
                                                 ("stage 2", "on")]
    assert all(peak is None and seconds > 0 for peak, seconds in results.values())
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="no CUDA GPU here"):
            gpu_step.main(["--device", "cuda"])


def test_enhance_denoise_trains_a_flow_per_level_on_one_extraction(flows, capsys):
    from benchmarks import enhance_denoise
    tiny = ("--width 16 --depth 1 --heads 2 --batch_size 4 --lr_warmup_steps 1 --validation_steps 0 "
            "--feature_batch_size 8 --mixed_precision no")
    results = enhance_denoise.main(argv_of(run=flows["root"], noise_stds="0.5,1.0", max_steps=2, num_samples=4,
                                           enhancer_steps=1, num_beams=1, flow_args=tiny))
    captured = capsys.readouterr()
    assert_machine_line(captured.out)
    assert captured.err.count("features: reusing") == 1  # the second level reads the first's extraction
    for s in (0.5, 1.0):
        assert os.path.isfile(os.path.join(flows["root"], f"flow_denoise_{s:g}", "flow_2.pt"))
    (table,) = tables(captured.out)
    assert table[0] == ["z", "cos noisy", "cos ridge", "cos flow", "all-right noisy", "all-right ridge",
                        "all-right flow"]
    assert [r[0] for r in table[1:]] == ["clean", "noise 0.5 x std", "noise 1 x std"]
    assert 1 > results[0.5]["noisy"][0] > results[1.0]["noisy"][0]  # more noise, further from z
    with pytest.raises(BadInput, match="--noise_stds"):
        enhance_denoise.parse_args(["--noise_stds", "0.5,-1"])
