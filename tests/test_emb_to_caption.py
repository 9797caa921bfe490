"""The stage-2 captioner on tiny LMs built and saved here (a GPT-2 like distilgpt2, a Llama), loaded
through AutoModelForCausalLM / AutoTokenizer.from_pretrained exactly as a real LM folder."""
import pytest
import torch

from benchmarks.decoding_speed import beam_search_reference
from conftest import CAPTIONS, save_tiny_gpt2, save_tiny_llama
from errors import BadInput
from models.emb_to_caption import BeamSharedPromptLayer, EmbToCaption, _lora_targets, best_in_group
from transformers.cache_utils import DynamicLayer

L, D = 4, 16  # prefix length and width of z


def train(captioner, z, captions, steps, lr=3e-3, **loss_kwargs):
    params = [p for p in captioner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    captioner.train()
    losses = []
    for _ in range(steps):
        loss = captioner(z, captions, **loss_kwargs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    captioner.eval()
    return losses


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="module")
def overfit(gpt2_dir):
    """A fine-tuned tiny GPT-2 captioner that has learned CAPTIONS from 4 random z."""
    torch.manual_seed(0)
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D, proj="mlp", freeze_lm=False)
    z = torch.randn(len(CAPTIONS), L, D)
    losses = train(captioner, z, CAPTIONS, steps=120, lr=5e-3)
    return captioner, z, losses


def test_overfits_captions_exactly_and_stops_at_eos(overfit):
    captioner, z, losses = overfit
    assert losses[-1] < 0.05, losses[-1]
    max_new = 32
    for num_beams in (1, 3):
        assert captioner.generate(z, num_beams=num_beams, max_new_tokens=max_new) == CAPTIONS
    # Stopped by the trained EOS, not by the length limit (only new tokens come back).
    prefix = captioner.prefix_embeds(z)
    ids = captioner.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                                **captioner.generation_kwargs(num_beams=3, max_new_tokens=max_new))
    longest = max(len(captioner.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in CAPTIONS)
    assert ids.shape[1] == longest + 1 < max_new
    assert (ids == captioner.eos_id).any(dim=1).all()


def unseen_z(z_train, n, seed):
    """Mixtures of the training z plus noise: captions of varied lengths, some off the training set."""
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(3 * torch.randn(n, len(z_train), generator=g), dim=1)
    return torch.einsum("nk,kld->nld", w, z_train) + 0.5 * torch.randn(n, L, D, generator=g)


def test_batched_equals_one_at_a_time(overfit):
    captioner, z_train, _ = overfit
    z = unseen_z(z_train, 6, seed=1)
    for num_beams in (1, 3):
        batched = captioner.generate(z, num_beams=num_beams, max_new_tokens=16)
        single = [captioner.generate(z[i:i + 1], num_beams=num_beams, max_new_tokens=16)[0] for i in range(len(z))]
        assert batched == single
        assert len(set(batched)) > 2


@pytest.mark.parametrize("lm", ["gpt2", "llama_lora"])
def test_prefix_run_once_per_image_gives_generates_own_beams(lm, gpt2_dir, tmp_path, monkeypatch):
    """generate() runs the prefix once per image and hands the beams one shared copy of its cache
    (BeamSharedPromptLayer): the same token ids as transformers' generate() running it once per
    beam (a Llama: rotary positions after a handed-in cache; LoRA: peft's wrapper)."""
    torch.manual_seed(0)
    path, lora = (gpt2_dir, False) if lm == "gpt2" else (save_tiny_llama(tmp_path / "llama"), True)
    captioner = EmbToCaption.from_pretrained(path, prefix_len=L, prefix_dim=D, freeze_lm=lora, lora=lora)
    train(captioner, torch.randn(len(CAPTIONS), L, D), CAPTIONS, steps=25, lr=5e-3)
    z = 2 * torch.randn(5, L, D)
    layer_types, lm_generate = set(), captioner.lm.generate

    def spy(*args, **kwargs):
        layer_types.update(type(layer) for layer in kwargs["past_key_values"].layers)
        return lm_generate(*args, **kwargs)
    monkeypatch.setattr(captioner.lm, "generate", spy)
    captioner.generate(z, num_beams=3, max_new_tokens=4)
    monkeypatch.undo()
    assert layer_types == {BeamSharedPromptLayer}
    for num_beams, max_new in ((3, 12), (4, 7)):
        kwargs = captioner.generation_kwargs(num_beams=num_beams, max_new_tokens=max_new)
        prefix = captioner.prefix_embeds(z)
        with torch.no_grad():
            ids = captioner.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2],
                                        dtype=torch.long), **kwargs)
        expected = captioner.decode(ids)
        assert captioner.generate(z, num_beams=num_beams, max_new_tokens=max_new) == expected
    assert len(set(expected)) > 1


def test_shared_prompt_layer_holds_what_dynamic_layer_holds():
    """Appends and within-image reorders, past the planned room (the buffer grows): at every step
    the same keys and values as transformers' DynamicLayer copied to the beams; a reorder that
    moves a beam to another image is refused."""
    torch.manual_seed(0)
    images, heads, P, d, beams = 2, 2, 5, 4, 3
    prompt = DynamicLayer()
    prompt.update(torch.randn(images, heads, P, d), torch.randn(images, heads, P, d))
    shared = BeamSharedPromptLayer(prompt, beams, room=2)
    reference = DynamicLayer()
    reference.update(prompt.keys.repeat_interleave(beams, 0), prompt.values.repeat_interleave(beams, 0))
    for _ in range(5):
        new = torch.randn(2, images * beams, heads, 1, d)
        for got, want in zip(shared.update(*new), reference.update(*new)):
            assert torch.equal(got, want)
        beam_idx = (torch.arange(images)[:, None] * beams + torch.randint(beams, (images, beams))).flatten()
        shared.reorder_cache(beam_idx)
        reference.reorder_cache(beam_idx)
    assert shared.get_seq_length() == reference.get_seq_length() == P + 5
    assert torch.equal(shared.keys[:, :, :P + 5], reference.keys)
    assert torch.equal(shared.values[:, :, :P + 5], reference.values)
    crossing = BeamSharedPromptLayer(prompt, beams, room=2)
    crossing.update(*torch.randn(2, images * beams, heads, 1, d))
    with pytest.raises(RuntimeError, match="moved a beam to another image"):
        crossing.reorder_cache(torch.tensor([0, 0, 3, 1, 4, 5]))


def test_beam_search_reference_matches_generate(overfit):
    captioner, z_train, _ = overfit
    z = torch.cat([z_train[:2], unseen_z(z_train, 4, seed=2)])
    for num_beams, max_new in ((3, 16), (2, 5), (4, 12)):
        assert beam_search_reference(captioner, z, num_beams, max_new) == \
            captioner.generate(z, num_beams=num_beams, max_new_tokens=max_new)


def test_beam_search_reference_matches_generate_half_trained(gpt2_dir):
    """Half-trained, EOS competes with other tokens, so beams finish at different steps."""
    torch.manual_seed(0)
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D, freeze_lm=False)
    train(captioner, torch.randn(len(CAPTIONS), L, D), CAPTIONS, steps=25, lr=5e-3)
    z = 2 * torch.randn(6, L, D)
    for num_beams, max_new in ((3, 12), (5, 9)):
        expected = captioner.generate(z, num_beams=num_beams, max_new_tokens=max_new)
        assert beam_search_reference(captioner, z, num_beams, max_new) == expected
    assert len({len(c.split()) for c in expected}) > 1


def test_loss_covers_caption_and_eos_only(gpt2_dir):
    """A batch's loss is the token-weighted mean of its captions' losses: padding, the prefix and
    BOS add nothing; each caption counts its tokens + EOS."""
    torch.manual_seed(0)
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D, proj="linear").eval()
    z = torch.randn(2, L, D)
    caps = [CAPTIONS[0], CAPTIONS[1]]
    n = [len(captioner.tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in caps]
    with torch.no_grad():
        alone = [captioner(z[i:i + 1], [c]).item() for i, c in enumerate(caps)]
        batch = captioner(z, caps).item()
    assert n[0] != n[1]
    assert batch == pytest.approx((n[0] * alone[0] + n[1] * alone[1]) / (n[0] + n[1]), rel=1e-5)
    assert captioner.bos_id == captioner.eos_id == captioner.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert captioner.tokenizer.pad_token is not None and captioner.tokenizer.padding_side == "right"


def test_best_in_group_keeps_each_groups_lowest_score():
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 0.5, 5.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 2, 1, 0])
    # group 0: 1.0 at 1 and 6 (the first wins); group 1: a tie of 5.0 (the first wins); group 2 alone
    assert best_in_group(scores, groups).tolist() == [False, True, False, True, True, False, False]


# Two true captions of one scene that name its objects in either order.
BOTH_ORDERS = ["there is a small blue square above a large green triangle",
               "a large green triangle below a small blue square"]


def test_best_ref_loss_is_the_loss_of_each_images_most_likely_reference(gpt2_dir):
    torch.manual_seed(0)
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D, freeze_lm=False).eval()
    z = torch.randn(2, L, D)
    refs = [CAPTIONS + BOTH_ORDERS, BOTH_ORDERS]
    captions = [c for r in refs for c in r]
    groups = torch.tensor([g for g, r in enumerate(refs) for _ in r])
    with torch.no_grad():
        nll = [captioner.token_nll(z[g:g + 1], [c])[0].sum().item() for g, c in zip(groups.tolist(), captions)]
    best = [min((i for i in range(len(captions)) if groups[i] == g), key=nll.__getitem__) for g in (0, 1)]
    loss = captioner(z, captions, groups)
    assert loss.item() == pytest.approx(captioner(z, [captions[i] for i in best]).item(), rel=1e-5)
    loss.backward()  # only the chosen references train: the others get no gradient through z
    assert all(p.grad is not None for p in captioner.proj.parameters())


@pytest.mark.parametrize("lm", ["gpt2", "llama"])
def test_shared_prefix_scores_equal_one_prefix_per_caption(lm, gpt2_dir, tmp_path):
    """Scoring the references of an image against its prefix once (a cached prefix shared by its
    captions) gives the NLL of reading each caption after its own copy of the prefix."""
    llm = gpt2_dir if lm == "gpt2" else save_tiny_llama(tmp_path / "tiny_llama")
    torch.manual_seed(0)
    captioner = EmbToCaption.from_pretrained(llm, prefix_len=L, prefix_dim=D, freeze_lm=False).eval()
    z = torch.randn(3, L, D)
    captions = CAPTIONS + BOTH_ORDERS + [""]       # of unequal lengths, and one of EOS alone
    groups = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    with torch.no_grad():
        shared, mask = captioner.token_nll(z, captions, groups)
        copied, copied_mask = captioner.token_nll(z[groups], captions)
    assert torch.equal(mask, copied_mask)
    assert torch.allclose(shared * mask, copied * mask, atol=1e-5)
    assert captioner.token_nll(z[:1], [""], torch.tensor([0]))[0].shape == (1, 1)


def fit_both_orders(gpt2_dir, groups=None, pick="best", steps=100):
    """A captioner trained on BOTH_ORDERS for one z, with the plain loss (groups=None) or one
    caption picked per step; returns it and the z."""
    torch.manual_seed(0)
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D, freeze_lm=False)
    z = torch.randn(1, L, D).expand(2, -1, -1)  # one z per caption
    train(captioner, z if groups is None else z[:1], BOTH_ORDERS, steps, lr=1e-2, groups=groups, pick=pick)
    return captioner, z


def prob_of_each(captioner, z):
    with torch.no_grad():
        return torch.exp(-captioner.token_nll(z, BOTH_ORDERS)[0].sum(1))


def test_best_ref_training_commits_to_one_of_two_true_captions(gpt2_dir):
    """Taught both orders at once, a captioner splits its belief between them (the order is then a
    coin toss at every decoding step); taught the more likely of the two, it settles on one."""
    both = prob_of_each(*fit_both_orders(gpt2_dir)).tolist()
    assert sum(both) > 0.9 and all(0.3 < p < 0.7 for p in both), both
    best = prob_of_each(*fit_both_orders(gpt2_dir, groups=torch.tensor([0, 0]))).tolist()
    assert max(best) > 0.95, best


def test_sampled_reference_follows_the_models_posterior(gpt2_dir):
    """pick="sample" draws each image's caption with probability p(c_j|z) / sum_k p(c_k|z)."""
    captioner, z = fit_both_orders(gpt2_dir, steps=60)
    posterior = prob_of_each(captioner, z)
    posterior = posterior / posterior.sum()
    assert 0.1 < posterior[0] < 0.9, posterior  # both plausible, so the draw is not trivial
    n = 4000  # n images of that scene, each with both captions
    keep = captioner.pick_references(z[:1].expand(n, -1, -1), BOTH_ORDERS * n,
                                     torch.arange(n).repeat_interleave(2), pick="sample").view(n, 2)
    assert keep.sum(1).eq(1).all()  # one caption of each image
    assert keep[:, 0].float().mean().item() == pytest.approx(posterior[0].item(), abs=0.03)
    best = captioner.pick_references(z[:1], BOTH_ORDERS, torch.tensor([0, 0]), pick="best")
    assert best.tolist() == [bool(posterior[0] > 0.5), bool(posterior[0] <= 0.5)]


def test_posterior_ref_training_also_commits(gpt2_dir):
    """Drawn from the posterior, the chosen caption grows likelier and is drawn more often: the
    captioner ends on one order too, from a start that trains both."""
    probs = prob_of_each(*fit_both_orders(gpt2_dir, groups=torch.tensor([0, 0]), pick="sample", steps=200))
    assert max(probs.tolist()) > 0.9, probs


def test_frozen_lm_gets_no_grad(gpt2_dir):
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D)  # freeze_lm=True by default
    captioner(torch.randn(2, L, D), CAPTIONS[:2]).backward()
    assert all(p.grad is None for p in captioner.lm.parameters())
    assert all(p.grad is not None for p in captioner.proj.parameters())
    assert set(captioner.trainable_state_dict()) == {n for n, _ in captioner.proj.named_parameters(prefix="proj")}
    assert captioner.config == dict(llm=gpt2_dir, prefix_len=L, prefix_dim=D, proj="mlp", freeze_lm=True,
                                    lora=False, lora_rank=8)


def test_lora_trains_only_adapters_and_round_trips(gpt2_dir):
    torch.manual_seed(0)
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D, lora=True, lora_rank=4)
    trainable = [n for n, p in captioner.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("proj.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    z = torch.randn(len(CAPTIONS), L, D)
    losses = train(captioner, z, CAPTIONS, steps=10)
    assert losses[-1] < losses[0]

    sd = captioner.trainable_state_dict()
    assert set(sd) == set(trainable)
    fresh = EmbToCaption.from_pretrained(**captioner.config).eval()
    with torch.no_grad():
        assert fresh(z, CAPTIONS).item() != pytest.approx(captioner(z, CAPTIONS).item())
        fresh.load_trainable_state_dict({k: v.clone() for k, v in sd.items()})
        assert fresh(z, CAPTIONS).item() == pytest.approx(captioner(z, CAPTIONS).item(), rel=1e-6)
    assert fresh.generate(z, num_beams=3, max_new_tokens=8) == captioner.generate(z, num_beams=3, max_new_tokens=8)

    with pytest.raises(BadInput, match="does not match"):
        EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D).load_trainable_state_dict(sd)


def test_lora_targets_fall_back_to_attention_layers(gpt2_dir, monkeypatch):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert _lora_targets(lm) == (["c_attn"], True)  # peft's table; GPT-2's Conv1D is fan_in_fan_out
    monkeypatch.delitem(table, "gpt2")              # as for an architecture peft does not know
    targets, fan_in_fan_out = _lora_targets(lm)
    assert fan_in_fan_out and targets == [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")]


def test_llama_loads_trains_and_generates(tmp_path):
    llama_dir = save_tiny_llama(tmp_path / "tiny_llama")
    torch.manual_seed(0)
    captioner = EmbToCaption.from_pretrained(llama_dir, prefix_len=L, prefix_dim=D, lora=True)
    tok = captioner.tokenizer
    assert (captioner.bos_id, captioner.eos_id) == (tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("</s>"))
    assert tok.pad_token == "</s>"
    assert any("q_proj.lora_A" in n for n, p in captioner.named_parameters() if p.requires_grad)
    z = torch.randn(3, L, D)
    losses = train(captioner, z, CAPTIONS[:3], steps=15, lr=1e-2)
    assert losses[-1] < losses[0]
    batched = captioner.generate(z, num_beams=3, max_new_tokens=6)
    assert batched == [captioner.generate(z[i:i + 1], num_beams=3, max_new_tokens=6)[0] for i in range(3)]
    assert all(isinstance(c, str) for c in batched)


def test_bad_arguments_give_one_clear_line(tmp_path, gpt2_dir):
    missing = str(tmp_path / "no_such_lm")
    with pytest.raises(BadInput, match="no_such_lm: cannot load a causal LM") as e:
        EmbToCaption.from_pretrained(missing, prefix_len=L, prefix_dim=D)
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match="pick one"):
        EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D, freeze_lm=False, lora=True)
    with pytest.raises(BadInput, match="unknown projection"):
        EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D, proj="conv")
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D)
    with pytest.raises(ValueError, match="expected"):
        captioner.generate(torch.randn(1, L + 1, D))


def test_decoding_settings_are_checked(gpt2_dir):
    captioner = EmbToCaption.from_pretrained(gpt2_dir, prefix_len=L, prefix_dim=D)
    with pytest.raises(TypeError, match=r"unknown decoding settings \['beams'\]"):
        captioner.generate(torch.randn(1, L, D), beams=3)
    # the tiny GPT-2 has 64 positions: a prefix of L (+1 BOS) and 60 new tokens do not fit
    with pytest.raises(BadInput, match=r"prefix \(5\) \+ max_new_tokens \(60\) exceeds the LM's 64 positions"):
        captioner.generate(torch.randn(1, L, D), max_new_tokens=60)
    kwargs = captioner.generation_kwargs(num_beams=2, do_sample=True, top_p=0.5)
    assert (kwargs["num_beams"], kwargs["top_p"], kwargs["top_k"], kwargs["repetition_penalty"]) == (2, 0.5, 0, 1.0)
    assert "top_p" not in captioner.generation_kwargs()  # beam search: no sampling settings
