"""Shared fixtures: tiny models saved in the real formats, so the code under test loads them
exactly as it loads the real ones (a diffusers Stable Diffusion folder, the HF hub cache)."""
import os
import shutil

# One thread per process unless told otherwise: on the shared 2-core machine, two OpenMP threads
# spin-waiting against other processes made a tiny UNet step ~50x slower (11 s instead of 0.2 s).
# Set before torch is imported; subprocesses of the tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch came in earlier

# pycocoevalcap's PTB tokenizer and METEOR run on Java. Without it those tests skip, except under
# CI=true (.ci/run installs a Java runtime): there a missing Java fails the run instead of skipping.
if shutil.which("java") is None and os.environ.get("CI") == "true":
    raise pytest.UsageError("CI=true but java is not on PATH: the pycocoevalcap tests need it "
                            "(apt-get install -y default-jre-headless)")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is needed by pycocoevalcap")

TINY_SD_IMAGE_SIZE = 16  # VAE downsamples by 2 -> 8x8x4 latents = UNet sample_size
TINY_SD_SEQ_LEN = 16
TINY_SD_EMBED_DIM = 32
TINY_VAE_SCALING = 0.5  # not SD's 0.18215, so code that hard-codes SD's value fails the tests


def tiny_clip_tokenizer():
    """A CLIPTokenizer (byte-level BPE, as SD's) over a tiny vocab: letters, a few merges."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,"
    tokens = ["!", "<|startoftext|>", "<|endoftext|>"]  # SD 2.x pads with "!" (id 0)
    tokens += list(letters) + [c + "</w>" for c in letters]
    merges = [("r", "e"), ("re", "d</w>"), ("o", "n</w>")]
    tokens += ["re", "red</w>", "on</w>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!",
                         model_max_length=TINY_SD_SEQ_LEN)


def build_tiny_sd(out_dir, prediction_type="epsilon", seed=0):
    """Save a tiny, randomly initialised SD pipeline with StableDiffusionPipeline.save_pretrained."""
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=TINY_SD_IMAGE_SIZE,
        scaling_factor=TINY_VAE_SCALING)
    unet = UNet2DConditionModel(
        sample_size=TINY_SD_IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_SD_EMBED_DIM, attention_head_dim=4, use_linear_projection=True)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_SD_EMBED_DIM, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TINY_SD_SEQ_LEN,
        hidden_act="gelu", pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    # The schedulers SD 2.1 ships: PNDM for the epsilon 2.1-base, DDIM for the v-prediction 2.1.
    scheduler_cls = PNDMScheduler if prediction_type == "epsilon" else DDIMScheduler
    scheduler = scheduler_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type=prediction_type,
                              set_alpha_to_one=False, steps_offset=1,
                              **({"skip_prk_steps": True} if scheduler_cls is PNDMScheduler
                                 else {"clip_sample": False}))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return str(out_dir)


_TINY_SD_CACHE = {}


def make_tiny_sd(tmp_path_factory, prediction_type="epsilon"):
    """The tiny SD folder for this prediction type, built once per test session."""
    key = (str(tmp_path_factory.getbasetemp()), prediction_type)
    if key not in _TINY_SD_CACHE:
        out = tmp_path_factory.mktemp(f"tiny_sd_{prediction_type}")
        _TINY_SD_CACHE[key] = build_tiny_sd(out, prediction_type)
    return _TINY_SD_CACHE[key]


def put_in_hf_cache(folder, cache_dir, repo_id, revision="0123456789abcdef0123456789abcdef01234567"):
    """Place a saved model folder in the HF hub cache layout, as if downloaded as `repo_id`:
    cache_dir/models--org--name/{refs/main, snapshots/<40-hex>/...}. Returns cache_dir.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once, at import: a test in this process
    must also patch huggingface_hub.constants (see the hf_offline_cache fixture), or run the
    loader in a subprocess with the environment set."""
    repo_dir = os.path.join(str(cache_dir), "models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, os.path.join(repo_dir, "snapshots", revision))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(revision)
    return str(cache_dir)


def reset_accelerator_state():
    """As in a new process (common.fresh_accelerator_state); module fixtures that run a stage call it."""
    import common
    common.fresh_accelerator_state()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test's training runs start as in a new process."""
    reset_accelerator_state()


def argv_of(**kwargs):
    """--key value for each keyword (a bare --key for True): a script's command line."""
    argv = []
    for k, v in kwargs.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny epsilon-prediction SD folder (16 px images, 8x8x4 latents, L=16, D=32)."""
    return make_tiny_sd(tmp_path_factory, "epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory):
    """The same tiny SD with a v-prediction scheduler (like SD 2.1-768)."""
    return make_tiny_sd(tmp_path_factory, "v_prediction")


@pytest.fixture
def hf_offline_cache(tmp_path, monkeypatch):
    """An empty HF hub cache in offline mode, for this test only. Returns a function
    put(folder, repo_id) that places a saved folder in it under repo_id."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Already imported: the module constants are what huggingface_hub reads at call time.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return lambda folder, repo_id: put_in_hf_cache(folder, cache, repo_id)


# ---------------------------------------------------------------------------------------------
# Tiny causal LMs saved as Hugging Face folders, loaded as distilgpt2 / a Llama would be.

CAPTIONS = [
    "a large red circle on the left",
    "there is a small blue square above a large green triangle",
    "a single small white triangle at the top",
    "an image of a large yellow square in the middle",
]
# More text for the tokenizer, so the BPE vocabulary is not just these four captions.
CORPUS = CAPTIONS + [f"a {s} {c} {sh} {p}" for s in ("small", "large") for c in ("red", "green", "blue", "purple")
                     for sh in ("circle", "square") for p in ("on the right", "at the bottom", "in the center")]


def save_tiny_gpt2(out_dir, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.toy_lm import train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=512)
    eot = tokenizer.eos_token_id
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=eot, eos_token_id=eot))
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def save_tiny_llama(out_dir, seed=0):
    """A Llama with its own <s> BOS and </s> EOS and no pad token, as Llama ships."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id))
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_sd_dir):
    """A tiny toy world, two stage-1 runs on the tiny SD (seeds 0 and 1), stage 2 (fine-tuning the
    encoder) on a tiny GPT-2: what the enhancer tests (flows, the bridge) train on."""
    import train_stage1
    import train_stage2
    from data import toy_world
    root = tmp_path_factory.mktemp("world")
    data = str(root / "data")
    toy_world.generate(data, num_train=24, num_val=6, seed=0)
    common_args = dict(data_dir=data, num_workers=0, validation_steps=0, num_validation_images=1)
    stage1 = str(root / "stage1")
    reset_accelerator_state()
    train_stage1.main(argv_of(sd_model_id=tiny_sd_dir, output_dir=stage1, image_size=16, backbone="toy",
                              backbone_weights="none", encoder_width=32, encoder_layers=1, batch_size=4,
                              max_steps=2, num_inference_steps=1, **common_args))
    other1 = str(root / "stage1_other")
    reset_accelerator_state()
    train_stage1.main(argv_of(sd_model_id=tiny_sd_dir, output_dir=other1, image_size=16, backbone="toy",
                              backbone_weights="none", encoder_width=32, encoder_layers=1, batch_size=4,
                              max_steps=2, num_inference_steps=1, seed=1, **common_args))
    gpt2 = save_tiny_gpt2(root / "gpt2")
    stage2 = str(root / "stage2")
    reset_accelerator_state()
    train_stage2.main(argv_of(stage1_ckpt=stage1, llm=gpt2, output_dir=stage2,
                              batch_size=4, lr=1e-3, lr_warmup_steps=1, max_steps=2, max_new_tokens=6,
                              finetune_encoder=True, **common_args))
    return dict(root=root, data=data, stage1=stage1, other1=other1, stage2=stage2, gpt2=gpt2)


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, saved as its published weights file is (a
    plain state dict .pth), so the FID code runs its real path without the download. Convolutions
    get variance-keeping init: with the default one the pool3 features shrink towards zero."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return str(path)
