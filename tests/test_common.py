"""The shared stage machinery (common.py): precision auto, the Trainer's accumulation, its resume
(EMA and gradient scaler included, refusals), checkpoints that survive a SIGKILL, and the one
error path of every script's entry point."""
import argparse
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import reset_accelerator_state
from errors import BadInput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# --mixed_precision auto

@pytest.mark.parametrize("avx512_bf16,amx,kind,expected", [(False, False, None, "no"),
                                                           (True, False, "avx512_bf16", "no"),
                                                           (True, True, "amx", "bf16")])
def test_auto_is_bf16_only_on_a_cpu_with_amx(monkeypatch, avx512_bf16, amx, kind, expected):
    """bf16 where it is faster than fp32 (AMX); not where it is emulated (AVX2), nor where AVX512-BF16
    alone made a step no faster (docs/measurements.md, "Precision auto")."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert common.cpu_bf16() == kind
    assert common.resolve_mixed_precision("auto", cuda=False)[0] == expected
    assert common.resolve_mixed_precision("no", cuda=False)[0] == "no"


def test_a_onednn_cap_counts_as_the_features_it_leaves_out(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    for cap, kind in (("avx2", None), ("AVX512_CORE", None), ("AVX512_CORE_BF16", "avx512_bf16"),
                      ("AVX512_CORE_AMX", "amx"), ("ALL", "amx")):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert common.cpu_bf16() == kind, cap


def test_explicit_bf16_on_an_avx2_cpu_warns_and_fp16_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(common, "cpu_bf16", lambda: None)
    assert common.resolve_mixed_precision("bf16", cuda=False)[0] == "bf16"
    assert "emulated" in capsys.readouterr().err
    monkeypatch.setattr(common, "cpu_bf16", lambda: "avx512_bf16")
    assert common.resolve_mixed_precision("bf16", cuda=False)[0] == "bf16"  # asked for: no warning
    assert capsys.readouterr().err == ""
    with pytest.raises(BadInput, match="fp16 needs a CUDA GPU"):
        common.resolve_mixed_precision("fp16", cuda=False)


@pytest.mark.parametrize("kind", [None, "amx"])
def test_a_stage_records_what_auto_chose(tmp_path, monkeypatch, capsys, kind):
    """The toy LM's stage (the cheapest real one) at its default auto: args.json holds the choice."""
    from scripts import train_toy_lm
    from test_toy_lm import CAPTIONS, write_captions
    monkeypatch.setattr(common, "cpu_bf16", lambda: kind)
    data = write_captions(tmp_path / "data", CAPTIONS * 3)
    out = str(tmp_path / "lm")
    train_toy_lm.main(["--data_dir", data, "--output_dir", out, "--max_steps", "1", "--batch_size", "2",
                       "--n_positions", "16", "--n_layer", "1", "--n_embd", "16", "--n_head", "2"])
    chosen = "bf16" if kind else "no"
    assert json.load(open(os.path.join(out, "args.json")))["mixed_precision"] == chosen
    why = "CPU with AMX" if kind else "CPU without native bf16"
    assert f"mixed precision: {chosen} (auto: {why})" in capsys.readouterr().err


def test_every_preset_leaves_precision_to_auto():
    for preset in common.PRESETS.values():
        assert all("mixed_precision" not in part for part in preset.values())


# ---------------------------------------------------------------------------------------------
# The Trainer on a toy regression, through the shared set-up

class Pairs(torch.utils.data.Dataset):
    """16 (x, y) pairs of a noisy linear map."""

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}

    def image_of(self, i):
        return i


def regression_args(out, **overrides):
    p = argparse.ArgumentParser()
    common.add_training_args(p)
    argv = ["--output_dir", str(out), "--batch_size", "4", "--lr", "0.05", "--lr_warmup_steps", "1",
            "--max_steps", "6", "--checkpointing_steps", "3", "--checkpoints_total_limit", "0",
            "--num_workers", "0", "--log_every", "1", "--mixed_precision", "no"]
    for k, v in overrides.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return p.parse_args(argv)


def run_regression(args, scaler=None):
    """One training run of a Linear(4, 1); returns the trainer. scaler: a CPU GradScaler put where
    accelerate keeps its fp16 one (there is no fp16 autocast on a CPU), to test its checkpointing."""
    reset_accelerator_state()
    accelerator, _ = common.setup_run(args, "test")
    if scaler is not None:
        accelerator.scaler = scaler  # before prepare: the prepared optimizer steps through it
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    dataset = Pairs()
    loader = common.train_loader(dataset, args, accelerator)
    optimizer, lr_scheduler, steps_per_epoch, max_steps = common.build_optimization(
        accelerator, args, model.parameters(), loader)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    trainer = common.Trainer(accelerator=accelerator, args=args, model=model, optimizer=optimizer,
                             lr_scheduler=lr_scheduler, loader=loader, steps_per_epoch=steps_per_epoch,
                             max_steps=max_steps, kind="test", prefix="reg", config={},
                             model_state=model.state_dict, load_model_state=model.load_state_dict)
    common.resume(trainer, args)
    trainer.train(lambda b: torch.nn.functional.mse_loss(model(b["x"]), b["y"]))
    common.finish_run(trainer, dataset)
    return trainer


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """2 micro-batches of 2 with --gradient_accumulation_steps 2 train as 1 batch of 4 (the same
    samples, the same mean loss per optimizer step, clipping on the summed gradient)."""
    big = run_regression(regression_args(tmp_path / "b4", max_grad_norm=0.5))
    accumulated = run_regression(regression_args(tmp_path / "b2x2", batch_size=2, gradient_accumulation_steps=2,
                                                 max_grad_norm=0.5))
    assert big.step == accumulated.step == 6 and big.steps_per_epoch == accumulated.steps_per_epoch == 4
    for a, b in zip(big.params, accumulated.params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    one = run_regression(regression_args(tmp_path / "b2", batch_size=2))  # without accumulation: another run
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(big.params, one.params))


def test_ema_and_grad_scaler_survive_a_resume(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def scaler():  # doubles its scale every step (growth_interval 1): its state changes each step
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1)

    extra = dict(use_ema=True, ema_decay=0.9)
    a = run_regression(regression_args(straight, **extra), scaler())
    assert a.accelerator.scaler.get_scale() == 2.0 ** 10
    os.makedirs(resumed)
    os.link(straight / "reg_3.pt", resumed / "reg_3.pt")
    b = run_regression(regression_args(resumed, resume_from="latest", **extra), scaler())
    assert b.accelerator.scaler.get_scale() == 2.0 ** 10  # a fresh scaler would stand at 2**7
    assert a.accelerator.scaler.state_dict() == b.accelerator.scaler.state_dict()
    ema_a, ema_b = common.load_checkpoint(straight / "reg_6.pt", "test")["ema"], \
        common.load_checkpoint(resumed / "reg_6.pt", "test")["ema"]
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 6
    for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]):
        assert torch.equal(x, y)
    for x, y in zip(a.params, b.params):
        assert torch.equal(x, y)
    # the EMA is not the weights: it averaged them
    assert not all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], a.params))


def test_resume_refuses_other_trajectory_settings(tmp_path):
    out = tmp_path / "run"
    run_regression(regression_args(out, max_steps=3))
    # each is refused in Trainer.resume, before any step: the bf16 one computes nothing in bf16
    for changed, needle in ((dict(batch_size=2), "--batch_size 4"), (dict(lr=0.1), "--lr 0.05"),
                            (dict(gradient_accumulation_steps=2), "--gradient_accumulation_steps 1"),
                            (dict(mixed_precision="bf16"), "--mixed_precision no")):
        with pytest.raises(BadInput, match=f"other settings \\({needle}\\); resume with those"):
            run_regression(regression_args(out, resume_from="latest", **changed))
    ckpt = common.load_checkpoint(out / "reg_3.pt", "test")
    common.save_checkpoint(out / "reg_3.pt", {**ckpt, "num_processes": 2})
    with pytest.raises(BadInput, match="written by 2 processes, this run has 1; resume with 2"):
        run_regression(regression_args(out, resume_from="latest"))
    common.save_checkpoint(out / "reg_3.pt", {k: v for k, v in ckpt.items() if k != "args"})
    with pytest.raises(BadInput, match="records no run settings"):
        run_regression(regression_args(out, resume_from="latest"))
    # what does not change the trajectory may change: a longer run goes on, and says so
    common.save_checkpoint(out / "reg_3.pt", ckpt)
    assert run_regression(regression_args(out, resume_from="latest", max_steps=5, log_every=2)).step == 5


# ---------------------------------------------------------------------------------------------
# A run killed with SIGKILL while it writes a checkpoint

HANG_IN_FSYNC = """
import os, sys, time
real_fsync = os.fsync
def fsync(fd):
    # the checkpoint of step 4 is written in full, not yet renamed into place: hang there
    if os.readlink(f"/proc/self/fd/{fd}").endswith("toy_lm_4.pt.tmp"):
        open(sys.argv[1], "w").close()
        time.sleep(600)
    real_fsync(fd)
os.fsync = fsync
from scripts import train_toy_lm
train_toy_lm.main(sys.argv[2:])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the file being written through /proc")
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    from scripts import train_toy_lm
    from test_toy_lm import CAPTIONS, TINY, write_captions
    data = write_captions(tmp_path / "data", CAPTIONS * 5)
    argv = ["--data_dir", data, "--max_steps", "6", "--checkpointing_steps", "2", *TINY]
    killed, marker = str(tmp_path / "killed"), str(tmp_path / "hanging")
    child = subprocess.Popen([sys.executable, "-c", HANG_IN_FSYNC, marker, *argv, "--output_dir", killed],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(marker):
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the child never reached the step-4 checkpoint"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert os.path.exists(os.path.join(killed, "toy_lm_4.pt.tmp"))  # the write it was killed in
    assert common.resolve_resume("latest", killed, "toy_lm") == os.path.join(killed, "toy_lm_2.pt")
    assert common.load_checkpoint(os.path.join(killed, "toy_lm_2.pt"), "toy_lm")["step"] == 2
    assert not os.path.exists(os.path.join(killed, "config.json"))  # no half-saved LM folder either

    assert train_toy_lm.main(argv + ["--output_dir", killed, "--resume_from", "latest"])["step"] == 6
    straight = str(tmp_path / "straight")
    train_toy_lm.main(argv + ["--output_dir", straight])
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(killed, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# One error path: every script's entry point prints one line and exits with status 2

BAD_COMMAND_LINES = {
    "train_stage1.py": (["--output_dir", "o"], "--data_dir is required"),
    "train_stage2.py": (["--output_dir", "o", "--stage1_ckpt", "s1.pt", "--data_dir", "nowhere"],
                        "checkpoint s1.pt does not exist"),
    "infer.py": (["--image_path", "x.png", "--stage1_ckpt", "s1.pt", "--stage2_ckpt", "s2.pt"],
                 "checkpoint s1.pt does not exist"),
    "eval_captioning.py": (["--metrics", "bleu"], "nothing to score"),
    "train_flowmatching.py": (["--output_dir", "o", "--mode", "degrade", "--stage1_ckpt", "s1.pt", "--data_dir",
                               "d", "--degradations", "fog"], "unknown fog"),
    "scripts.train_toy_teacher": (["--data_dir", "nowhere"], "captions_train2017.json does not exist"),
    "scripts.train_toy_lm": (["--data_dir", "nowhere", "--output_dir", "o"], "generate the toy data first"),
    "data.toy_world": (["--output_dir", "o", "--num_train", "-1"], "--num_train must be in"),
}


@pytest.mark.parametrize("script", sorted(BAD_COMMAND_LINES))
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs an imported module
def test_bad_input_is_one_line_and_exit_status_2(script, tmp_path, monkeypatch, capsys):
    argv, needle = BAD_COMMAND_LINES[script]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:  # the script's own `if __name__ == "__main__":` guard
        if script.endswith(".py"):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        else:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err


# The one exception, and why: the generator's API is the seed's `MultimodalGenerator.from_run(run_dir)`,
# and the checkpoint loaders it needs live in common.py with the scripts' other loading code; the
# import is inside that classmethod, so importing models.generator still pulls in nothing above it.
IMPORTS_COMMON_INSIDE = {("models/generator.py", "from_run")}


def test_models_and_data_import_nothing_from_the_scripts_side():
    """models/ and data/ raise errors.BadInput; they never exit, and never import common.py."""
    import ast
    for folder in ("models", "data"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if not name.endswith(".py"):
                continue
            text = open(os.path.join(ROOT, folder, name)).read()
            assert "SystemExit" not in text, f"{folder}/{name}"
            tree = ast.parse(text)
            allowed = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
                       and (f"{folder}/{name}", fn.name) in IMPORTS_COMMON_INSIDE for node in ast.walk(fn)}
            for node in ast.walk(tree):
                imported = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                            [node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(m and m.split(".")[0] in ("common", "infer", "eval_captioning", "demo", "doctor")
                       for m in imported):
                    assert id(node) in allowed, f"{folder}/{name} imports {imported} (line {node.lineno})"


def test_a_run_saved_before_a_flag_existed_resumes_as_it_ran():
    from argparse import Namespace
    common.check_resume_settings("old.pt", {"lr": 1.0}, Namespace(lr=1.0, names_in_prompt=False))
    with pytest.raises(BadInput, match=r"other settings \(--clean_copies 0\)"):  # it ran without clean copies
        common.check_resume_settings("old.pt", {"lr": 1.0}, Namespace(lr=1.0, clean_copies=1))
    common.check_resume_settings("old.pt", {"lr": 1.0}, Namespace(lr=1.0, clean_copies=0))
    with pytest.raises(BadInput, match=r"--lr 1.0"):
        common.check_resume_settings("old.pt", {"lr": 1.0}, Namespace(lr=2.0, names_in_prompt=False))


def test_enhancer_flags_are_infers_defaults_with_overrides():
    import infer
    flags = common.enhancer_flags("flow_dir", enhancer_steps=4)
    defaults = vars(infer.parse_args(["--image_path", "x.png", "--stage1_ckpt", "s1", "--stage2_ckpt", "s2"]))
    assert flags.enhancer == "flow_dir" and flags.enhancer_steps == 4
    assert all(defaults[k] == v for k, v in vars(flags).items() if k not in ("enhancer", "enhancer_steps"))
    with pytest.raises(TypeError, match="enhancer_stepz"):
        common.enhancer_flags("none", enhancer_stepz=4)
