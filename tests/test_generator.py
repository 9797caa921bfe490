"""The generator (models/generator.py), infer.py --generate, doctor.py and demo.py (through
gradio_client and, in a real browser, Playwright driving Debian's Chromium), on tiny models."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import demo
import doctor
import infer
import train_flowmatching
from conftest import argv_of, reset_accelerator_state
from errors import BadInput
from models.generator import MultimodalGenerator, png_bytes

TINY = dict(num_inference_steps=2, decoding=dict(num_beams=2, max_new_tokens=5), batch_size=3)
GEN_FLAGS = dict(num_inference_steps=2, num_beams=2, max_new_tokens=5, ode_steps=4)


def train_prior(world, out, mode="prior", **overrides):
    reset_accelerator_state()
    kwargs = dict(stage1_ckpt=world["stage1"], stage2_ckpt=world["stage2"], data_dir=world["data"], mode=mode,
                  output_dir=out, width=16, depth=1, heads=2, batch_size=8, lr_warmup_steps=1, max_steps=2,
                  checkpointing_steps=2, validation_steps=0, feature_batch_size=8, degraded_copies=1,
                  ode_steps=2, **overrides)
    train_flowmatching.main(argv_of(**kwargs))
    return out


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """A run folder as a pipeline leaves it: stage1/, stage2/ and prior/."""
    root = tmp_path_factory.mktemp("gen_run")
    for part in ("stage1", "stage2"):
        os.symlink(tiny_world[part], root / part)
    train_prior(tiny_world, str(root / "prior"))
    return str(root)


@pytest.fixture(scope="module")
def gen(run):
    return MultimodalGenerator.from_run(run, ode_steps=4, **TINY)


def pixels(image):
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# The generator

def test_same_seed_same_png_bytes_and_caption(gen):
    image, caption = gen.generate(seed=42)
    again, caption_again = gen.generate(seed=42)
    assert png_bytes(image) == png_bytes(again) and caption == caption_again
    assert image.size == (16, 16) and isinstance(caption, str)
    other, _ = gen.generate(seed=43)
    assert png_bytes(other) != png_bytes(image)  # another seed draws another z and another start


def test_same_seed_across_two_processes(gen, run):
    image, caption = gen.generate(seed=7)
    code = ("import hashlib, sys; sys.path[:0] = ['.', 'tests']; import torch; torch.set_num_threads(1); "
            "from models.generator import MultimodalGenerator, png_bytes; "
            f"g = MultimodalGenerator.from_run({run!r}, ode_steps=4, **{TINY!r}); im, c = g.generate(7); "
            "print(hashlib.sha256(png_bytes(im)).hexdigest()); print(repr(c))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    digest, text = out.stdout.strip().splitlines()[-2:]
    assert digest == hashlib.sha256(png_bytes(image)).hexdigest()
    assert text == repr(caption)


def test_generate_batch_equals_one_at_a_time(gen):
    seeds = [5, 0, 11, 3, 8]
    batch = gen.generate_batch(seeds, batch_size=3, progress=False)
    assert [m["seed"] for _, _, m in batch] == seeds
    assert set(gen.last_times) == {"prior", "sd", "captioner"}
    for seed, (image, caption, meta) in zip(seeds, batch):
        one, one_caption = gen.generate(seed)
        assert png_bytes(image) == png_bytes(one) and caption == one_caption
        assert meta["batch_size"] in (3, 2)


def test_metadata_round_trips_through_json(gen, run):
    _, caption, meta = gen.generate_with_metadata(seed=1)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["seed"] == 1 and meta["caption"] == caption
    assert meta["latent_shape"] == [16, 32] and meta["image_size"] == [16, 16] and meta["device"] == "cpu"
    assert meta["num_inference_steps"] == 2 and meta["guidance_scale"] == 2.0
    assert meta["prior"] == {"kind": "flow", "ode_steps": 4, "solver": "heun"}
    assert set(meta["checkpoints"]) == {"stage1", "stage2", "prior"}
    assert meta["checkpoints"]["prior"]["name"].startswith(os.path.join(os.path.realpath(run), "prior", "flow_"))
    assert all(len(c["fingerprint"]) == 16 for c in meta["checkpoints"].values())
    assert meta["time_s"] > 0


def test_the_gaussian_baseline_serves_as_a_prior(run):
    gen = MultimodalGenerator.from_run(run, prior=os.path.join(run, "prior", "baseline.pt"), **TINY)
    assert gen.prior.kind == "gaussian" and gen.prior.noise_shape[0] <= 24  # rank <= the training images
    image, caption = gen.generate(3)
    assert png_bytes(image) == png_bytes(gen.generate(3)[0])


def test_prior_refusals_are_one_line(tiny_world, run, tmp_path):
    degrade = train_prior(tiny_world, str(tmp_path / "degrade"), mode="degrade")
    with pytest.raises(BadInput, match=r"is a degrade flow, not a prior over z; pass a flow_\{step\}.pt of "):
        MultimodalGenerator.from_run(run, prior=degrade, **TINY)
    with pytest.raises(BadInput, match="holds no flow_{step}.pt; train the prior"):
        MultimodalGenerator.from_run(run, prior=str(tmp_path), **TINY)
    # A prior of the stage-1 encoder, for a captioner whose stage 2 fine-tuned it: another z.
    reset_accelerator_state()
    train_flowmatching.main(argv_of(stage1_ckpt=tiny_world["stage1"], data_dir=tiny_world["data"], mode="prior",
                                    output_dir=str(tmp_path / "stage1_prior"), width=16, depth=1, heads=2,
                                    batch_size=8, max_steps=1, validation_steps=0, feature_batch_size=8))
    with pytest.raises(BadInput, match="was trained on the z of another encoder"):
        MultimodalGenerator.from_run(run, prior=str(tmp_path / "stage1_prior"), **TINY)
    with pytest.raises(BadInput, match="decodes captions deterministically"):
        MultimodalGenerator.from_run(run, decoding=dict(do_sample=True))
    with pytest.raises(BadInput, match="seeds are integers in 0..2"):
        MultimodalGenerator.from_run(run, **TINY).generate(-1)


# ---------------------------------------------------------------------------------------------
# infer.py --generate: PNGs + metadata.json, resumable

def generate_argv(run, out, seeds="0:5", **overrides):
    return argv_of(generate=True, run_dir=run, seeds=seeds, out_dir=out, batch_size=2, **{**GEN_FLAGS, **overrides})


def test_infer_generate_writes_pngs_and_metadata(gen, run, tmp_path):
    out = str(tmp_path / "samples")
    infer.main(generate_argv(run, out))
    records = json.load(open(os.path.join(out, "metadata.json")))
    assert [r["seed"] for r in records] == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(out)) == ["metadata.json"] + [f"seed_00{i}.png" for i in range(5)]
    ref = MultimodalGenerator.from_run(run, ode_steps=4, num_inference_steps=2,
                                       decoding=common.decoding_kwargs(infer.parse_args(generate_argv(run, out))))
    for r in records:
        image, caption = ref.generate(r["seed"])
        assert r["caption"] == caption and r["image_path"] == f"seed_{r['seed']:03d}.png"
        with open(os.path.join(out, r["image_path"]), "rb") as f:
            assert f.read() == png_bytes(image)


def test_a_killed_generate_resumes_without_redoing_finished_seeds(run, tmp_path, monkeypatch):
    full, out = str(tmp_path / "full"), str(tmp_path / "killed")
    infer.main(generate_argv(run, full))
    made = []
    real = MultimodalGenerator._generate

    def dies_after_one_batch(self, seeds):
        if made:
            raise KeyboardInterrupt  # killed during the second batch
        made.append(list(seeds))
        return real(self, seeds)

    monkeypatch.setattr(MultimodalGenerator, "_generate", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        infer.main(generate_argv(run, out))
    assert [r["seed"] for r in json.load(open(os.path.join(out, "metadata.json")))] == [0, 1]
    assert not [n for n in os.listdir(out) if ".tmp" in n]

    def counts(self, seeds):
        made.append(list(seeds))
        return real(self, seeds)

    made.clear()
    monkeypatch.setattr(MultimodalGenerator, "_generate", counts)
    infer.main(generate_argv(run, out))
    assert made == [[2, 3], [4]]  # the finished seeds 0 and 1 are not drawn again
    for name in os.listdir(full):
        with open(os.path.join(full, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            if name.endswith(".png"):
                assert a.read() == b.read(), name
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "batch_size")}  # noqa: E731
    assert [strip(r) for r in json.load(open(os.path.join(full, "metadata.json")))] == \
        [strip(r) for r in json.load(open(os.path.join(out, "metadata.json")))]


def test_generate_refuses_another_settings_out_dir_and_bad_seeds(run, tmp_path):
    out = str(tmp_path / "samples")
    infer.main(generate_argv(run, out, seeds="0:1"))
    with pytest.raises(BadInput, match=r"holds samples made with other settings \(num_inference_steps\); pass a new"):
        infer.main(generate_argv(run, out, seeds="0:2", num_inference_steps=3))
    for seeds in ("a:b", "5:5", "2,-1"):
        with pytest.raises(BadInput, match="--seeds"):
            infer.parse_args(generate_argv(run, out, seeds=seeds))
    with pytest.raises(BadInput, match="--generate needs --run_dir, or all three of"):
        infer.parse_args(argv_of(generate=True, stage1_ckpt=os.path.join(run, "stage1")))
    assert infer.parse_seeds("3,1,2") == [3, 1, 2] and infer.parse_seeds("2:5") == [2, 3, 4]


# ---------------------------------------------------------------------------------------------
# doctor.py

def test_doctor_passes_on_a_complete_run(run, capsys):
    assert doctor.main(["--run_dir", run, "--num_inference_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "ok    test generation: seed 0 -> 16x16 image" in out
    assert out.strip().endswith("checks passed")


def test_doctor_fails_with_one_line_on_a_missing_checkpoint(run, tmp_path, capsys):
    broken = tmp_path / "run"
    broken.mkdir()
    os.symlink(os.path.join(run, "stage1"), broken / "stage1")
    shutil.copytree(os.path.join(run, "prior"), broken / "prior")
    assert doctor.main(["--run_dir", str(broken)]) == 1
    lines = capsys.readouterr().out.splitlines()
    fails = [line for line in lines if line.startswith("FAIL")]
    assert fails == [f"FAIL  stage2: no captioner_<step>.pt in {broken / 'stage2'}; train it (python "
                     f"train_stage2.py --stage1_ckpt ... --output_dir {broken / 'stage2'}) or pass --stage2_ckpt "
                     f"(a captioner_<step>.pt or its run folder)"]
    assert "test generation" not in "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# demo.py: its API through gradio_client, and the page in a real browser

def expected_caption(gen, image_path):
    """What the demo's caption tab should say (its defaults: the generator's beams, 30 new tokens)."""
    from data.coco import image_transform, load_rgb
    images = image_transform(gen.vlv.image_size)(load_rgb(image_path)).unsqueeze(0)
    return gen.vlv.caption(images, **dict(gen.decoding, num_beams=2, max_new_tokens=30))[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(gen, tmp_path_factory):
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"  # a proxy must not stand between the test and the demo
    app = demo.build_demo(gen, None, num_beams=2)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                           share=False)
    image = tmp_path_factory.mktemp("upload") / "scene.png"
    gen.generate(4)[0].save(image)
    yield url, str(image)
    app.close()


def test_demo_serves_on_localhost_with_named_endpoints(served):
    from gradio_client import Client
    url, _ = served
    assert url.startswith("http://127.0.0.1:")
    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    assert {"/caption", "/generate", "/gallery"} <= set(api["named_endpoints"])
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_demo_caption_and_generate_through_gradio_client(gen, served):
    from gradio_client import Client, handle_file
    from PIL import Image
    url, image_path = served
    client = Client(url, verbose=False)
    caption, from_caption, from_z = client.predict(handle_file(image_path), api_name="/caption")
    assert caption == expected_caption(gen, image_path)
    assert Image.open(from_caption).size == Image.open(from_z).size == (16, 16)
    image, text, meta = client.predict(42, api_name="/generate")
    ref_image, ref_caption = gen.generate(42)
    assert text == ref_caption and meta["seed"] == 42
    assert np.array_equal(pixels(Image.open(image).convert("RGB")), pixels(ref_image))


def test_demo_says_in_the_page_when_the_upload_is_not_an_image(served, tmp_path, capfd):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    url, _ = served
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    capfd.readouterr()
    with pytest.raises(AppError, match=r"notes.png is not an image this demo can read \(UnidentifiedImageError\); "
                                       r"upload a JPEG, PNG or WebP file."):
        Client(url, verbose=False).predict(handle_file(str(bad)), api_name="/caption")
    assert "Traceback" not in capfd.readouterr().err  # a user's bad file is not logged as a server fault


def test_demo_says_in_the_page_when_the_seed_is_out_of_range(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, _ = served
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="Value -3 is less than minimum value 0"):  # Gradio's own check
        client.predict(-3, api_name="/generate")
    with pytest.raises(AppError, match="The seed must be a whole number from 0 to 2147483647"):
        client.predict(None, api_name="/generate")


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but no Chromium is on PATH: the browser test needs it (apt-get install -y chromium)")
    pytest.skip("no Chromium on PATH (apt-get install -y chromium)")


def test_demo_in_a_real_browser(gen, served, tmp_path):
    from playwright.sync_api import sync_playwright
    url, image_path = served
    executable = find_chromium()
    with sync_playwright() as p:
        # Debian's Chromium, not Playwright's download (which cannot run here); as root it needs --no-sandbox.
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(image_path)
            page.locator("#caption-button").click()
            page.wait_for_function("() => document.querySelector('#caption-out textarea').value.length > 0",
                                   timeout=60_000)
            assert page.locator("#caption-out textarea").input_value() == expected_caption(gen, image_path)
            page.get_by_role("tab", name="Generate from a seed").click()
            page.locator("#seed-in input").fill("7")
            page.locator("#generate-button").click()
            page.wait_for_function("() => document.querySelector('#generated-caption textarea').value.length > 0",
                                   timeout=60_000)
            assert page.locator("#generated-caption textarea").input_value() == gen.generate(7)[1]
            img = page.locator("#generated-image img")
            assert img.get_attribute("src").endswith(".png")
            assert img.evaluate("el => el.complete && el.naturalWidth") == 16
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------
# FID (the paper's reconstruction metric), on an Inception-shaped network with random weights

def test_fid_is_zero_for_the_same_images_and_grows_with_the_difference(fid_weights):
    import eval_captioning
    g = torch.Generator().manual_seed(0)
    real = [torch.rand(3, 16, 16, generator=g) for _ in range(4)]
    scores = eval_captioning.fid(real, {"same": real, "near": [0.9 * x for x in real],
                                        "far": [0.3 * torch.rand(3, 16, 16, generator=g) for _ in range(4)]},
                                 fid_weights, batch_size=3)
    assert abs(scores["same"]) < 1e-3 < scores["near"] < scores["far"]


def test_eval_captioning_reconstruction_fid(tiny_world, fid_weights, tmp_path):
    import eval_captioning
    base = dict(stage1_ckpt=tiny_world["stage1"], stage2_ckpt=tiny_world["stage2"], data_dir=tiny_world["data"],
                num_samples=4, num_inference_steps=2, num_beams=1, max_new_tokens=5, num_sheet_images=0)
    scores = eval_captioning.main(argv_of(out_jsonl=str(tmp_path / "p.jsonl"), metrics="fid", fid_weights=fid_weights,
                                          **base))
    assert scores["num_images"] == 4
    assert scores["FID (caption -> image)"] > 0 and scores["FID (z -> image)"] > 0
    assert "InceptionV3 pool3" in scores["fid_note"]
    with pytest.raises(BadInput, match=r"--metrics fid needs --fid_weights, .* download https://github.com/toshas/"):
        eval_captioning.parse_args(argv_of(out_jsonl=str(tmp_path / "p.jsonl"), metrics="fid", **base))
    with pytest.raises(BadInput, match="--fid_weights .*nope.pth does not exist; download https://"):
        eval_captioning.parse_args(argv_of(out_jsonl=str(tmp_path / "p.jsonl"), metrics="fid",
                                           fid_weights=str(tmp_path / "nope.pth"), **base))
    with pytest.raises(BadInput, match="needs --stage1_ckpt and --stage2_ckpt"):
        eval_captioning.parse_args(["--preds_json", str(tmp_path / "p.jsonl"), "--ann_json", "x", "--metrics", "fid"])
