"""Flow matching (models/flow.py), the enhancers, train_flowmatching.py and --enhancer / --save_features
in infer.py and eval_captioning.py, through their real `main`, on tiny saved models."""
import json
import os

import pytest
import torch
from PIL import Image

import common
import eval_captioning
import infer
import train_flowmatching
from conftest import argv_of, needs_java, reset_accelerator_state
from data.degrade import DEGRADATIONS, degrade, random_degrade
from data.predictions import read_features
from errors import BadInput
from models.enhancers import SDRefine
from models.flow import Flow, GaussianPrior, RidgeMap, VelocityNet, integrate, path_sample


# ---------------------------------------------------------------------------------------------
# The pieces

def test_path_and_solvers():
    x0, x1 = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    xt, target = path_sample(x0, x1, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], x1[2]) and torch.allclose(xt[1], (x0[1] + x1[1]) / 2)
    assert torch.allclose(target, x1 - x0)
    # dx/dt = x from 0 to 1: e^1; each solver's calls per step and order of accuracy
    calls = []

    def velocity(x, t):
        calls.append(1)
        return x

    x = torch.ones(2, 1)
    errors = {}
    for method, per_step in (("euler", 1), ("midpoint", 2), ("heun", 2)):
        calls.clear()
        errors[method] = (integrate(velocity, x, 0.0, 1.0, 10, method) - torch.e).abs().max().item()
        assert len(calls) == 10 * per_step
    assert errors["midpoint"] < errors["euler"] / 10 and errors["heun"] < errors["euler"] / 10
    with pytest.raises(ValueError, match="unknown ODE solver"):
        integrate(velocity, x, method="rk45")


def test_untrained_flow_is_the_identity_and_padding_is_ignored():
    net = VelocityNet(seq_len=6, dim=8, width=16, depth=2, heads=2)  # projected in and out
    x, t = torch.randn(2, 6, 8), torch.rand(2)
    assert net(x, t).abs().max() == 0  # adaLN-Zero and a zero output layer
    for p in net.parameters():  # any weights: padded tokens must not reach the others
        torch.nn.init.normal_(p, std=0.3)
    pad = torch.tensor([[False] * 4 + [True] * 2] * 2)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 2, 8) * 10
    assert torch.allclose(net(x, t, pad)[:, :4], net(y, t, pad)[:, :4], atol=1e-5)
    assert not torch.allclose(net(x, t)[:, :4], net(y, t)[:, :4], atol=1e-3)


def test_flow_overfits_a_handful_of_pairs():
    torch.manual_seed(0)
    x0, x1 = torch.randn(8, 4, 8), torch.randn(8, 4, 8)
    m, s = torch.zeros(4, 8), torch.ones(4, 8)
    flow = Flow(dict(seq_len=4, dim=8, width=32, depth=2, heads=2), m, s, m, s)
    before = (flow.transport(x0, steps=16) - x1).pow(2).mean().item()
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(600):
        loss = flow(x0, x1, torch.rand(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = (flow.transport(x0, steps=16) - x1).pow(2).mean().item()
    assert after < before / 10, (before, after)


def test_flow_end_point_carries_its_graph():
    """forward(..., endpoint_steps=K): x0 carried to t = 1 in K Euler steps, as transport() does, with
    gradients to the velocity network (what --caption_nll_weight trains through)."""
    torch.manual_seed(0)
    m, s = torch.zeros(4, 8), torch.ones(4, 8)
    flow = Flow(dict(seq_len=4, dim=8, width=16, depth=1, heads=2), m, s, m, s)
    for p in flow.parameters():  # adaLN-Zero starts at zero velocity: make it move
        torch.nn.init.normal_(p, std=0.1)
    x0, x1 = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    loss, end = flow(x0, x1, torch.rand(3), endpoint_steps=3)
    torch.testing.assert_close(end, flow.transport(x0, steps=3, method="euler"))
    assert not torch.allclose(end, x0)
    end.pow(2).sum().backward()
    assert all(p.grad is not None for p in flow.net.parameters())


def test_closed_form_baselines():
    torch.manual_seed(0)
    x0 = torch.randn(400, 3, 5)
    w, b = torch.randn(3, 5, 5), torch.randn(3, 5)
    x1 = torch.einsum("bld,lde->ble", x0, w) + b
    ridge = RidgeMap.fit(x0, x1, alpha=1e-8)
    assert torch.allclose(ridge(x0), x1, atol=1e-3)
    data = torch.randn(5000, 2, 3) @ torch.randn(3, 3) + 2.0
    prior = GaussianPrior.fit(data)
    samples = prior.sample(20000, torch.Generator().manual_seed(0))
    assert samples.shape == (20000, 2, 3)
    assert torch.allclose(samples.mean(0), data.mean(0), atol=0.1)
    cov = lambda x: torch.cov(x.flatten(1).T)  # noqa: E731
    assert torch.allclose(cov(samples), cov(data), atol=0.15 * cov(data).abs().max().item())


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_degradations_are_seeded_and_change_the_image(kind):
    image = torch.rand(3, 32, 32)
    a, b = degrade(image, kind, 5), degrade(image, kind, 5)
    assert a.shape == image.shape and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    assert (a - image).abs().mean() > 0.01
    picked = {random_degrade(image, sorted(DEGRADATIONS), s)[1] for s in range(40)}
    assert picked == set(DEGRADATIONS)


# ---------------------------------------------------------------------------------------------
# The scripts on a tiny world

@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def flow_argv(world, out, mode, **overrides):
    kwargs = dict(stage1_ckpt=world["stage1"], stage2_ckpt=world["stage2"], data_dir=world["data"], mode=mode,
                  output_dir=out, width=16, depth=1, heads=2, batch_size=8, lr_warmup_steps=1, max_steps=4,
                  checkpointing_steps=2, validation_steps=2, num_val_images=4, degraded_copies=2,
                  feature_batch_size=8, checkpoints_total_limit=0, log_every=1, ode_steps=2)
    kwargs.update(overrides)
    return argv_of(**{k: v for k, v in kwargs.items() if v is not None})  # None: leave the flag out


def train_flow(world, mode, name=None, **overrides):
    out = str(world["root"] / (name or f"flow_{mode}"))
    reset_accelerator_state()
    train_flowmatching.main(flow_argv(world, out, mode, **overrides))
    return out


@pytest.fixture(scope="module")
def flows(world):
    return {mode: train_flow(world, mode) for mode in train_flowmatching.MODES}


def test_every_mode_writes_flow_baseline_and_features(world, flows):
    for mode, out in flows.items():
        names = set(os.listdir(out))
        assert {"flow_2.pt", "flow_4.pt", "baseline.pt", "features.safetensors", "config.json"} <= names, mode
        ckpt = common.load_checkpoint(os.path.join(out, "flow_4.pt"), "flow")
        config = ckpt["config"]
        assert config["mode"] == mode and config["space"] == ("cond" if mode == "visual2text" else "z")
        # trained on the encoder stage 2 fine-tuned, not stage 1's
        assert config["encoder_fingerprint"] != config["stage1_fingerprint"]
        flow = common.flow_of(ckpt)
        assert flow.net.config["dim"] == 32 and flow.net.config["width"] == 16
        # clean -> clean pairs are degrade's alone (the other modes record none, as their older runs ran)
        assert ckpt["args"]["clean_copies"] == (1 if mode == "degrade" else 0), mode
    feats = read_features_file(os.path.join(flows["visual2text"], "features.safetensors"))
    assert feats["text"].shape[0] == feats["text_image"].shape[0] == 5 * feats["z"].shape[0]
    assert read_features_file(os.path.join(flows["degrade"], "features.safetensors"))["z_degraded"].shape[0] == 2


def read_features_file(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_degrade_pairs_include_clean_copies():
    z = torch.randn(3, 2, 4)
    feats = dict(z=z, z_degraded=torch.randn(2, 3, 2, 4))  # 2 corrupted copies of 3 images
    pairs = train_flowmatching.Pairs("degrade", feats, "cpu", clean_copies=1)
    assert pairs.size == 9
    x0, x1 = pairs(torch.arange(9))
    assert torch.equal(x1, z.repeat(3, 1, 1))
    assert torch.equal(x0[:6], feats["z_degraded"].flatten(0, 1)) and torch.equal(x0[6:], z)
    assert train_flowmatching.Pairs("degrade", feats, "cpu").size == 6


@pytest.mark.parametrize("mode", ["denoise", "degrade"])  # noise drawn per step; fixed pairs
def test_flow_resumed_run_equals_uninterrupted(world, flows, tmp_path, mode):
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    os.link(os.path.join(flows[mode], "flow_2.pt"), os.path.join(out, "flow_2.pt"))
    reset_accelerator_state()
    train_flowmatching.main(flow_argv(world, out, mode, resume_from="latest"))
    full = common.load_checkpoint(os.path.join(flows[mode], "flow_4.pt"), "flow")
    resumed = common.load_checkpoint(os.path.join(out, "flow_4.pt"), "flow")
    assert common.fingerprint(full["model"]) == common.fingerprint(resumed["model"])


def test_caption_nll_flow_trains_through_the_captioner_and_resumes_exactly(world, flows, tmp_path):
    """--caption_nll_weight: the frozen captioner's NLL of the clean image's captions at the flow's end
    point joins the loss (the flow then differs from the plain one), and a resumed run, whose
    captions are drawn from the checkpointed RNG, equals an unbroken one."""
    extra = dict(caption_nll_weight=1.0, caption_nll_steps=2)
    full = train_flow(world, "degrade", "flow_nll", **extra)
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    os.link(os.path.join(full, "flow_2.pt"), os.path.join(out, "flow_2.pt"))
    reset_accelerator_state()
    train_flowmatching.main(flow_argv(world, out, "degrade", resume_from="latest",
                                      features_cache=os.path.join(full, "features.safetensors"), **extra))
    ckpts = [common.load_checkpoint(os.path.join(d, "flow_4.pt"), "flow") for d in (full, out, flows["degrade"])]
    assert common.fingerprint(ckpts[0]["model"]) == common.fingerprint(ckpts[1]["model"])
    assert common.fingerprint(ckpts[0]["model"]) != common.fingerprint(ckpts[2]["model"])
    for overrides, match in [(dict(mode="prior"), "--mode prior does not end in the captioner's z"),
                             (dict(stage2_ckpt=None), "--caption_nll_weight needs the captioner")]:
        with pytest.raises(BadInput, match=match):
            train_flowmatching.main(flow_argv(world, str(tmp_path / "x"), **{"mode": "degrade", **extra, **overrides}))


def test_flow_with_ema_and_features_reused_on_resume(world, tmp_path, capsys):
    out = str(tmp_path / "ema")
    reset_accelerator_state()
    train_flowmatching.main(flow_argv(world, out, "prior", use_ema=True, ema_decay=0.5, max_steps=2))
    ckpt = common.load_checkpoint(os.path.join(out, "flow_2.pt"), "flow")
    flow = common.flow_of(ckpt)  # the EMA weights, not the raw ones
    raw = Flow.from_config(ckpt["config"])
    raw.load_state_dict(ckpt["model"])
    assert not torch.equal(flow.net.pos, raw.net.pos)
    assert torch.equal(flow.net.pos, ckpt["ema"]["shadow_params"][0])
    capsys.readouterr()
    reset_accelerator_state()
    train_flowmatching.main(flow_argv(world, out, "prior", use_ema=True, ema_decay=0.5, max_steps=3,
                                      resume_from="latest"))
    assert "features: reusing" in capsys.readouterr().err


def infer_argv(world, *extra, **kw):
    kwargs = dict(stage1_ckpt=world["stage1"], stage2_ckpt=world["stage2"], max_new_tokens=6, num_beams=2)
    kwargs.update(kw)
    return argv_of(**kwargs) + list(extra)


def val_image(world):
    return os.path.join(world["data"], "val2017", sorted(os.listdir(os.path.join(world["data"], "val2017")))[0])


def test_enhancer_none_is_todays_captions_and_flows_change_z(world, flows, capsys):
    image = val_image(world)
    plain = infer.main(infer_argv(world, image_path=image))
    assert infer.main(infer_argv(world, image_path=image, enhancer="none")) == plain
    for mode in ("denoise", "degrade", "visual2text"):
        for path in (flows[mode], os.path.join(flows[mode], "baseline.pt")):
            captions = infer.main(infer_argv(world, image_path=image, enhancer=path, enhancer_steps=2,
                                             enhancer_t0=0.25, enhancer_solver="heun"))
            assert len(captions) == 1 and isinstance(captions[0], str)
    vlv = common.load_vlv(world["stage1"], world["stage2"])
    images = torch.rand(2, 3, 16, 16)
    z, cond = vlv.embed(images)
    for mode in ("degrade", "visual2text"):
        args = infer.parse_args(infer_argv(world, image_path=image, enhancer=flows[mode], enhancer_steps=2))
        common.load_enhancer(args, vlv)
        z2, cond2 = vlv.embed(images)
        if mode == "degrade":
            assert not torch.allclose(z2, z) and not torch.allclose(cond2, cond)
        else:  # cond space: z untouched
            assert torch.equal(z2, z) and not torch.allclose(cond2, cond)


def test_sd_refine_lowers_the_teachers_loss(world):
    vlv = common.load_vlv(world["stage1"], world["stage2"])
    images = torch.rand(3, 3, 16, 16)
    z = vlv.encoder(images).detach()
    refine = SDRefine(vlv.sd, steps=5, lr=0.05, seed=0)
    z2 = refine(z, images)
    assert torch.equal(z2, refine(z, images))  # seeded

    def loss(z):  # the same noise and timesteps for both
        torch.manual_seed(123)
        latents = vlv.sd.encode_images(images)
        with torch.no_grad():
            return sum(vlv.sd.loss(latents, z).item() for _ in range(8))

    assert loss(z2) < loss(z)
    captions = infer.main(infer_argv(world, image_path=val_image(world), enhancer="sd_refine", refine_steps=2))
    assert len(captions) == 1


def test_enhancer_refusals_are_one_line(world, flows, tmp_path):
    image = val_image(world)
    cases = {
        # an enhancer trained on another encoder
        "another encoder": (dict(stage1_ckpt=world["stage1"], stage2_ckpt=world["stage2"]),
                            train_flow(world, "denoise", "flow_stage1_only", stage2_ckpt=None, max_steps=2),
                            "trained on the z of another encoder"),
        "another kind": (dict(), os.path.join(world["stage2"], "captioner_2.pt"), "not an enhancer"),
        "a prior": (dict(), flows["prior"], "is a prior"),
        "missing": (dict(), str(tmp_path / "nope.pt"), "does not exist"),
    }
    ckpt = torch.load(os.path.join(flows["denoise"], "flow_4.pt"), weights_only=True)
    ckpt["config"]["net"]["seq_len"] = 99
    torch.save(ckpt, tmp_path / "wide.pt")
    cases["a width mismatch"] = (dict(), str(tmp_path / "wide.pt"), r"works on \[99, 32\] embeddings")
    for name, (kw, enhancer, message) in cases.items():
        with pytest.raises(BadInput, match=message):
            infer.main(infer_argv(world, image_path=image, enhancer=enhancer, **kw))
    with pytest.raises(BadInput, match="--enhancer acts on a model's z"):
        eval_captioning.parse_args(["--preds_json", image, "--ann_json", image, "--enhancer", flows["denoise"]])


class Killed(Exception):
    pass


def test_save_features_killed_and_resumed_writes_every_image_once(world, flows, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    src = os.path.join(world["data"], "val2017")
    names = sorted(os.listdir(src))
    for n in names:
        Image.open(os.path.join(src, n)).save(folder / n)
    argv = infer_argv(world, image_dir=str(folder), enhancer=flows["degrade"], enhancer_steps=2, batch_size=2)
    whole = str(tmp_path / "whole.safetensors")
    infer.main(argv + ["--save_features", whole])
    full_names, full = read_features(whole)
    assert full_names == names and set(full) == {"z", "z_enhanced"} and full["z"].shape == (len(names), 16, 32)
    assert not os.path.exists(whole + ".parts")

    out = str(tmp_path / "killed.safetensors")
    real_embed, calls, killed = infer.common.load_vlv, [], []

    def flaky_vlv(*a, **k):
        vlv = real_embed(*a, **k)
        real = vlv.embed

        def embed(images):
            calls.append(len(images))
            if len(calls) == 2 and not killed:
                killed.append(True)
                raise Killed  # killed during the second batch
            return real(images)
        vlv.embed = embed
        return vlv

    monkeypatch.setattr(infer.common, "load_vlv", flaky_vlv)
    with pytest.raises(Killed):
        infer.main(argv + ["--save_features", out])
    assert not os.path.exists(out) and os.listdir(out + ".parts") == ["part_000000.safetensors"]
    calls.clear()
    infer.main(argv + ["--save_features", out])
    assert sum(calls) == len(names) - 2  # the first batch was not computed again
    got_names, got = read_features(out)
    assert got_names == names
    for k in full:
        assert torch.allclose(got[k], full[k], atol=1e-6)
    with pytest.raises(BadInput, match="was made with enhancer="):  # another enhancer into the same file
        infer.main(infer_argv(world, image_dir=str(folder), batch_size=2) + ["--save_features", out])
    with pytest.raises(BadInput, match="--save_features writes the features of a folder"):
        infer.main(infer_argv(world, image_path=val_image(world), save_features=out))


@needs_java
def test_eval_captioning_with_an_enhancer(world, flows, tmp_path):
    base = dict(stage1_ckpt=world["stage1"], stage2_ckpt=world["stage2"], data_dir=world["data"], num_samples=4,
                metrics="bleu", max_new_tokens=6, num_sheet_images=0)
    plain = eval_captioning.main(argv_of(out_jsonl=str(tmp_path / "plain.jsonl"), **base))
    none = eval_captioning.main(argv_of(out_jsonl=str(tmp_path / "none.jsonl"), enhancer="none", **base))
    assert plain == none
    scores = eval_captioning.main(argv_of(out_jsonl=str(tmp_path / "flow.jsonl"), enhancer=flows["degrade"],
                                          enhancer_steps=2, **base))
    assert scores["num_images"] == 4
    with pytest.raises(BadInput, match="was made with enhancer="):
        eval_captioning.main(argv_of(out_jsonl=str(tmp_path / "plain.jsonl"), enhancer=flows["degrade"], **base))
    assert json.load(open(tmp_path / "flow.jsonl.settings.json"))["enhancer"] == flows["degrade"]


def test_the_toy_presets_degrade_part_sets_only_degrade_flows(world, tmp_path):
    """--preset toy's flow_degrade part (a longer run) reaches --mode degrade, not the other modes,
    and an explicit flag still wins."""
    base = ["--preset", "toy", "--data_dir", str(world["data"]), "--stage1_ckpt", str(world["stage1"]),
            "--output_dir", str(tmp_path)]
    steps = {mode: train_flowmatching.parse_args(base + ["--mode", mode]).max_steps for mode in ("degrade", "prior")}
    assert steps == {"degrade": common.PRESETS["toy"]["flow_degrade"]["max_steps"],
                     "prior": common.PRESETS["toy"]["flow"]["max_steps"]}
    assert steps["degrade"] != steps["prior"]
    assert train_flowmatching.parse_args(base + ["--mode", "degrade", "--max_steps", "7"]).max_steps == 7
