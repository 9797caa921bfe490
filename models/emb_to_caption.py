"""Stage-2 captioner D: the caption embedding z [B,L,D] -> a caption, through a causal LM.

A projection psi (linear | mlp) maps every one of the L vectors of z to the LM's input width; the
L projected vectors are a prefix of `inputs_embeds`, as in ClipCap and VLV. Training and inference
feed the LM the same sequence:

    [psi(z): L positions] [BOS, if the tokenizer has one] [caption tokens] [EOS]

The labels are -100 on the prefix, on BOS and on padding, so the loss covers the caption tokens
and EOS. EOS is trained (the official VLV code trains none and has to cut its captions afterwards),
so `generate()` stops by itself. Every prefix has the same length L, so batched generation needs no
left padding: the attention mask is all ones at the start, and transformers' `generate()` runs
batched beam search with the KV cache straight from `inputs_embeds` (the prefix run once an image,
its keys and values held once for all its beams: BeamSharedPromptLayer).

Any causal LM that `AutoModelForCausalLM` loads works (GPT-2/distilgpt2, Qwen2.5, Llama, the toy
LM of scripts/train_toy_lm.py): token embeddings come from `lm.get_input_embeddings()`, the width from
its `embedding_dim`, LoRA targets from peft's table or, for unknown architectures, from the
Linear/Conv1D layers inside attention blocks.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.pytorch_utils import Conv1D

from errors import BadInput

# Longer captions are cut (EOS is still appended): COCO captions are ~10-20 tokens, and a cap keeps
# a stray paragraph from blowing up a batch or running past a GPT-2's learned positions.
MAX_CAPTION_TOKENS = 64

# What decoding depends on, with the values used when a caller leaves one out: generate()'s keyword
# arguments, and the decoding flags of infer.py and eval_captioning.py (common.add_decoding_args).
DECODING = dict(num_beams=3, max_new_tokens=30, min_new_tokens=0, length_penalty=1.0,
                no_repeat_ngram_size=0, do_sample=False, top_p=0.9, temperature=1.0)


def _load_lm(llm, dtype):
    # Local folders and hub ids (from the HF cache when HF_HUB_OFFLINE=1) both go through the Auto
    # classes. Never trust_remote_code: the captioner must not run code shipped with weights.
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm)
        lm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"--llm {llm}: cannot load a causal LM and its tokenizer ({reason}); pass a local "
                       f"Hugging Face folder (config.json, weights, tokenizer files; e.g. `python -m "
                       f"scripts.train_toy_lm` writes one) or a hub id already in the HF cache (HF_HUB_OFFLINE=1 "
                       f"skips the network)")
    return lm, tokenizer


def _lora_targets(lm):
    """peft's default LoRA targets for known architectures, else every Linear/Conv1D inside an
    attention block (full module names, so an MLP layer with the same short name is left alone)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(lm.config.model_type)
    if targets is None:
        targets = [name for name, m in lm.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D)) and ("attn" in name.lower() or "attention" in name.lower())]
    if not targets:
        raise BadInput(f"LoRA: found no Linear/Conv1D layer inside attention in a {type(lm).__name__}; "
                       f"use --finetune_lm or keep the LM frozen")
    # GPT-2 style Conv1D stores weights transposed; peft needs to be told.
    targeted = [m for name, m in lm.named_modules()
                if any(name == t or name.endswith("." + t) for t in targets)]
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in targeted)
    return list(targets), fan_in_fan_out


def best_in_group(scores, groups):
    """scores [B], groups [B] (group ids) -> [B] bool: the lowest score of each group (the first on ties)."""
    order = torch.argsort(scores, stable=True)
    first = torch.ones_like(groups, dtype=torch.bool)
    # After a stable sort by score, a stable sort by group puts each group's best first.
    by_group = order[torch.argsort(groups[order], stable=True)]
    first[1:] = groups[by_group][1:] != groups[by_group][:-1]
    keep = torch.zeros_like(first)
    keep[by_group[first]] = True
    return keep


def pad_ids(ids, pad_id, device):
    """Token-id lists -> (ids right-padded with pad_id [N,T], mask [N,T], 1 on real tokens). Padded
    in Python and made one tensor, not one small copy per row (192 a toy stage-2 step)."""
    T = max(len(x) for x in ids)
    tokens = torch.tensor([x + [pad_id] * (T - len(x)) for x in ids], device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids], device=device)
    return tokens, mask


def caption_nll(logits, tokens, token_mask, label_smoothing=0.0):
    """logits [M,V] at the M real caption positions of token_mask [N,T] (row-major, as x[mask]
    orders them) -> -log p of each token [N,T], 0 at padding. cross_entropy reads rows: over the
    [N,V,T] transpose of [N,T,V] it is about 2x slower on a CPU; with BLIP's 30,522-word head (run
    on the real positions alone) that was a third of a posterior_ref step."""
    keep = token_mask.bool()
    nll = F.cross_entropy(logits.float(), tokens[keep], reduction="none", label_smoothing=label_smoothing)
    return torch.zeros(tokens.shape, dtype=nll.dtype, device=nll.device).masked_scatter(keep, nll)


def rms_noised(x, std):
    """x [B,...] plus Gaussian noise of std times each row's RMS element (CapDec's noise injection,
    scaled to the embedding rather than absolute)."""
    rms = x.detach().float().flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (x.dim() - 1))
    return x + std * rms.to(x.dtype) * torch.randn_like(x)


def flatten_references(refs):
    """[[caption, ...] for each image] -> (captions, groups): every caption in one list, and the
    LongTensor [N] of the image each belongs to (the groups of EmbToCaption.forward)."""
    return [c for r in refs for c in r], torch.tensor([g for g, r in enumerate(refs) for _ in r])


class Captioner(nn.Module):
    """What every captioner shares (the prefix one here, models.blip, models.evcap): the stage-2
    loss over one caption per z or one of each image's references, the generate() settings, and
    checkpoints of the trainable weights only. A subclass defines token_nll(z, captions, groups,
    label_smoothing) and generate(z, **decoding), and sets eos_id and pad_id."""

    kind = None  # "prefix" | "blip" | "evcap": what the stage-2 checkpoint's config records
    label_smoothing = 0.0  # of the training loss (BLIP's 0.1); reference picking always scores plain -log p

    # ---- training -----------------------------------------------------------------------------
    def forward(self, z, captions, groups=None, pick="best"):
        """Teacher-forced LM loss: the mean over caption tokens + EOS of the batch.

        z [B,L,D] and one caption per row; or, with groups (LongTensor [N], caption i belongs to
        image groups[i] of z), all the references of each image, of which one counts, so the
        captioner may commit to one of several equally true phrasings (e.g. which of two objects it
        names first) instead of being pulled towards all of them at once.
        pick="best": the caption the model finds most likely (multiple-choice learning,
        Guzman-Rivera et al. 2012); pick="sample": one drawn from the model's posterior over the
        image's captions, p(c_j | z) / sum_k p(c_k | z) (Gumbel-max), whose gradient is an unbiased
        estimate of that of the marginal likelihood log sum_j p(c_j | z): it starts as a uniform
        choice and sharpens only as the model commits."""
        if groups is not None:
            groups = groups.to(z.device)
            if len(captions) != groups.shape[0]:
                raise ValueError(f"{len(captions)} captions but {groups.shape[0]} groups")
            keep = self.pick_references(z, captions, groups, pick)
            z, captions = z[groups[keep]], [c for c, k in zip(captions, keep.tolist()) if k]
        elif len(captions) != z.shape[0]:
            raise ValueError(f"{z.shape[0]} prefixes but {len(captions)} captions")
        nll, token_mask = self.token_nll(z, captions, label_smoothing=self.label_smoothing)
        return nll.sum() / token_mask.sum()

    @torch.no_grad()
    def pick_references(self, z, captions, groups, pick="best"):
        """[N] bool: the one caption of each image of z that the loss trains on (forward's pick)."""
        if pick not in ("best", "sample"):
            raise ValueError(f"pick={pick!r}: use 'best' or 'sample'")
        groups = groups.to(z.device)
        # Scored without a graph and without dropout; only the chosen captions then get a backward
        # pass, one per image, not one per reference.
        was_training = self.training
        self.eval()
        try:
            score = self.token_nll(z, captions, groups)[0].sum(1)       # [N] -log p(caption | z)
        finally:
            self.train(was_training)
        if pick == "sample":  # argmin of (-log p - Gumbel noise) is a sample of the posterior
            score = score + torch.log(-torch.log(torch.rand_like(score).clamp_min(1e-20)))
        return best_in_group(score, groups)

    # ---- inference ----------------------------------------------------------------------------
    def check_room(self, max_new_tokens, fix="lower max_new_tokens"):
        """One line when the prefix (prefix_positions) and max_new_tokens new tokens pass the LM's
        max_positions (None: no limit)."""
        if self.max_positions is not None and self.prefix_positions + max_new_tokens > self.max_positions:
            raise BadInput(f"prefix ({self.prefix_positions}) + max_new_tokens ({max_new_tokens}) exceeds the "
                           f"LM's {self.max_positions} positions; {fix}")

    def generation_kwargs(self, **decoding):
        """transformers generate() arguments for the DECODING settings given (the rest at their
        defaults). transformers 5 fills every generation field left unset from the LM's
        generation_config.json (e.g. a chat model's repetition_penalty or top_k): the neutral value of
        each is set, so that decoding depends on these settings only."""
        unknown = sorted(set(decoding) - set(DECODING))
        if unknown:
            raise TypeError(f"unknown decoding settings {unknown}; known: {sorted(DECODING)}")
        d = {**DECODING, **decoding}
        kwargs = dict(num_beams=d["num_beams"], max_new_tokens=d["max_new_tokens"],
                      min_new_tokens=d["min_new_tokens"], length_penalty=d["length_penalty"],
                      no_repeat_ngram_size=d["no_repeat_ngram_size"], do_sample=d["do_sample"],
                      early_stopping=False, repetition_penalty=1.0, num_return_sequences=1,
                      eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        if d["do_sample"]:
            kwargs.update(top_p=d["top_p"], temperature=d["temperature"], top_k=0)
        return kwargs

    def decode(self, ids):
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ---- checkpoints ---------------------------------------------------------------------------
    def saved_parameters(self) -> dict:
        """What a checkpoint holds: the parameters that train (a subclass adds frozen ones that no
        pretrained file holds)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict:
        """Only what trains: the projection, plus LoRA weights or the whole LM when they train."""
        return {name: p.detach() for name, p in self.saved_parameters().items()}

    def load_trainable_state_dict(self, sd):
        params = self.saved_parameters()
        missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
        if missing or unexpected:
            raise BadInput(f"captioner checkpoint does not match this {self.kind} captioner (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); rebuild it with the config saved with the checkpoint "
                           f"(its captioner kind, proj, lora, freeze_lm)")
        with torch.no_grad():
            for name, p in params.items():
                if sd[name].shape != p.shape:
                    raise BadInput(f"captioner checkpoint: {name} has shape {tuple(sd[name].shape)}, the model "
                                   f"{tuple(p.shape)}; rebuild it with the config saved with the checkpoint")
                p.copy_(sd[name])


class EmbToCaption(Captioner):
    """z [B,L,D] -> caption. A projection (linear | mlp) maps z to the LM width and is prepended as
    inputs_embeds before the caption tokens; prefix positions are -100 in the labels; an EOS token is
    appended to every caption in training, so generate() stops by itself."""

    kind = "prefix"

    def __init__(self, lm, tokenizer, config, proj_in=None):
        super().__init__()
        self.lm, self.tokenizer, self.config = lm, tokenizer, config
        hidden = lm.get_input_embeddings().embedding_dim
        d = proj_in or config["prefix_dim"]  # what psi reads: z's width, or a subclass's tokens
        if config["proj"] == "linear":
            self.proj = nn.Linear(d, hidden)
        elif config["proj"] == "mlp":
            self.proj = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        else:
            raise BadInput(f"proj={config['proj']!r}: unknown projection; use 'linear' or 'mlp'")

        # Some LM tokenizers (GPT-2, Llama) ship no pad token. Padding never reaches the loss
        # (-100) or attention (mask 0), so EOS serves.
        if tokenizer.eos_token_id is None:
            eos = lm.generation_config.eos_token_id if lm.generation_config.eos_token_id is not None \
                else lm.config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            if eos is None:
                raise BadInput(f"--llm {config['llm']}: its tokenizer and config define no end-of-text token, so "
                               f"the captioner cannot learn to stop; use an LM with an eos_token")
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        # A BOS token marks "text starts here" for LMs trained with one (Llama's <s>, GPT-2's
        # <|endoftext|> document separator); Qwen2.5 has none and gets none.
        self.bos_id = tokenizer.bos_token_id
        self.max_positions = getattr(lm.config, "max_position_embeddings", None)
        self.prefix_positions = config["prefix_len"] + (self.bos_id is not None)  # what prefix_embeds gives

    @classmethod
    def from_pretrained(cls, llm, prefix_len, prefix_dim, proj="mlp", freeze_lm=True, lora=False,
                        lora_rank=8, dtype=torch.float32) -> "EmbToCaption":
        """llm: hub id or local HF folder. freeze_lm=True keeps the LM fixed (only psi trains);
        lora=True adds peft LoRA adapters to the frozen LM; freeze_lm=False trains the whole LM."""
        if lora and not freeze_lm:
            raise BadInput("lora=True adapts a frozen LM and freeze_lm=False trains all of it; pick one")
        lm, tokenizer = _load_lm(llm, dtype)
        config = dict(llm=llm, prefix_len=prefix_len, prefix_dim=prefix_dim, proj=proj,
                      freeze_lm=freeze_lm, lora=lora, lora_rank=lora_rank)
        lm.requires_grad_(not freeze_lm)
        if lora:
            from peft import LoraConfig, get_peft_model
            targets, fan_in_fan_out = _lora_targets(lm)
            lm = get_peft_model(lm, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.05,
                                               target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                                               bias="none", task_type="CAUSAL_LM"))
        return cls(lm, tokenizer, config)

    # ---- inputs -------------------------------------------------------------------------------
    def embed_tokens(self, ids):
        return self.lm.get_input_embeddings()(ids)

    def loss_inputs(self, z, captions, groups=None):
        """(The prefix the loss reads for these captions of z, the captions it scores): EVCap's
        prefix may hold the captions' names, and its counterfactual pairs rewrite the captions."""
        return self.prefix_embeds(z), captions

    def prefix_embeds(self, z):
        """z [B,L,D] -> [B, L(+1 for BOS), H] in the LM's dtype: the start of every sequence."""
        if z.dim() != 3 or z.shape[1:] != (self.config["prefix_len"], self.config["prefix_dim"]):
            raise ValueError(f"z has shape {tuple(z.shape)}; expected [B, {self.config['prefix_len']}, "
                             f"{self.config['prefix_dim']}]")
        weight = self.lm.get_input_embeddings().weight
        prefix = self.proj(z.to(self.proj_dtype)).to(weight.dtype)  # [B,L,H]
        if self.bos_id is not None:
            bos = self.embed_tokens(torch.full((z.shape[0], 1), self.bos_id, device=z.device))
            prefix = torch.cat([prefix, bos], dim=1)
        return prefix

    @property
    def proj_dtype(self):
        return next(self.proj.parameters()).dtype

    def tokenize(self, captions):
        """captions -> list of token-id lists: caption tokens + EOS (no BOS; it is in the prefix)."""
        limit = MAX_CAPTION_TOKENS
        if self.max_positions is not None:
            limit = min(limit, self.max_positions - self.prefix_positions - 1)
        ids = self.tokenizer([c.strip() for c in captions], add_special_tokens=False)["input_ids"]
        return [x[:limit] + [self.eos_id] for x in ids]

    def token_nll(self, z, captions, groups=None, label_smoothing=0.0):
        """-log p of every caption token + EOS given z and the tokens before it: ([N,T], mask [N,T]).
        Caption i is read after the prefix of z[i], or of z[groups[i]] when groups is given: then
        each image's prefix runs through the LM once and all its captions attend to the same cached
        keys and values (the prefix is 77 (+1) positions with SD 2.1, 16 (+1) on the toy world)."""
        prefix, captions = self.loss_inputs(z, captions, groups)        # [B,P,H], P = L(+1)
        ids = self.tokenize(captions)
        tokens, token_mask = pad_ids(ids, self.pad_id, z.device)
        (N, T), P = tokens.shape, prefix.shape[1]
        attention_mask = torch.cat([torch.ones((N, P), dtype=torch.long, device=z.device), token_mask], dim=1)
        if groups is None:
            inputs_embeds = torch.cat([prefix, self.embed_tokens(tokens)], dim=1)   # [N,P+T,H]
            logits = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False,
                             logits_to_keep=T + 1).logits[:, :-1]                  # [N,T,V]: from P-1
        else:
            groups = groups.to(z.device)
            out = self.lm(inputs_embeds=prefix, use_cache=True, logits_to_keep=1)
            logits = out.logits[groups]                                 # [N,1,V]: predicts token 0
            if T > 1:
                cache = out.past_key_values
                cache.batch_select_indices(groups)                      # [B,...] -> [N,...]
                rest = self.lm(inputs_embeds=self.embed_tokens(tokens[:, :-1]),
                               attention_mask=attention_mask[:, :-1], past_key_values=cache).logits
                logits = torch.cat([logits, rest], dim=1)               # [N,T,V]
        # Position P-1+t predicts caption token t; padding counts nothing.
        return caption_nll(logits[token_mask.bool()], tokens, token_mask, label_smoothing), token_mask

    # ---- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, z, names=None, **decoding) -> list[str]:
        """z [B,L,D] -> B captions. Batched beam search (greedy when num_beams=1) or sampling, with
        the KV cache; decoding: the DECODING settings (num_beams, max_new_tokens, ...). names: EVCap's
        names per image when retrieved outside it (VLV.caption's region retrieval)."""
        kwargs = self.generation_kwargs(**decoding)
        self.check_room(kwargs["max_new_tokens"])
        was_training = self.training
        # No dropout while decoding, even when called for samples during training: the prefix
        # too (EVCap's Q-Formers have dropout).
        self.eval()
        try:
            prefix = self.prefix_embeds(z) if names is None else self.prefix_embeds(z, names)  # [B,P,H]
            # Same length for every prefix: no padding, the mask is all ones.
            attention_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
            beams = kwargs["num_beams"] * kwargs["num_return_sequences"]
            if beams > 1 and prefix.shape[1] > 1:
                # generate() would run the prefix once per beam; run it once per image and hand
                # generate() the cache, held once for all the beams: it feeds only the uncached last
                # position. Same captions; 1.8-2.1x the captions/s of generate() alone for EVCap's
                # 98-position prompt on the toy world (benchmarks.decoding_speed).
                cache = DynamicCache(config=self.lm.config)
                self.lm(inputs_embeds=prefix[:, :-1], attention_mask=attention_mask[:, :-1],
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
                if all(type(layer) is DynamicLayer for layer in cache.layers):
                    # One more position per new token, and the last prefix position fed first.
                    room = kwargs["max_new_tokens"] + 1
                    cache.layers = [BeamSharedPromptLayer(layer, beams, room) for layer in cache.layers]
                else:   # sliding-window layers and the like: transformers' own copy and reorder
                    cache.batch_repeat_interleave(beams)                # [B,...] -> [B*beams,...]
                kwargs["past_key_values"] = cache
            with warnings.catch_warnings():
                # The prompt is embeddings, not tokens, so n-gram blocking sees only the new tokens: as wanted.
                warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
                # Decoder-only LMs given inputs_embeds alone return only the new tokens.
                out = self.lm.generate(inputs_embeds=prefix, attention_mask=attention_mask, **kwargs)
        finally:
            self.train(was_training)
        return self.decode(out)


class BeamSharedPromptLayer(DynamicLayer):
    """One layer's KV cache for beam search over a shared prompt: the prompt's keys and values,
    [B,H,P,d], copied once to the beams, and room for `room` more positions in the same buffer.

    transformers' DynamicLayer appends with `torch.cat` and its beam search reorders with
    `index_select`, so every step copies the whole cache twice, the prompt included; on EVCap's
    98-position prompt that is 77% of a CPU step. Every beam of an image holds the same prompt, and
    beam search only ever moves beams within an image, so here new positions are written in place
    and a reorder moves only the generated part. Same keys and values at every step, so the same
    captions (tests/test_emb_to_caption.py); no transformers cache does this (StaticLayer reorders
    its whole buffer).
    """

    def __init__(self, layer: DynamicLayer, beams: int, room: int):
        super().__init__()
        keys, values = layer.keys, layer.values                         # [B,H,P,d]
        B, H, P, d = keys.shape
        self.dtype, self.device = keys.dtype, keys.device
        self.beams, self.prompt_len, self.length = beams, P, P
        self.keys = keys.new_empty((B * beams, H, P + room, d))
        self.values = values.new_empty((B * beams, H, P + room, d))
        self.keys[:, :, :P] = keys.repeat_interleave(beams, dim=0)
        self.values[:, :, :P] = values.repeat_interleave(beams, dim=0)
        self.reordered = False
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:       # more positions than planned: grow (a copy, as DynamicLayer)
            more = lambda x: x.new_empty(x.shape[:2] + (max(end, x.shape[-2]),) + x.shape[3:])
            self.keys, self.values = (torch.cat([x, more(x)], dim=-2) for x in (self.keys, self.values))
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]          # views, no copy

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx):
        if not self.reordered:
            # The prompt is not moved, so a beam must stay with its image: checked once a search.
            own = torch.arange(beam_idx.numel(), device=beam_idx.device) // self.beams
            if not torch.equal(beam_idx.to(own.device) // self.beams, own):
                raise RuntimeError("beam search moved a beam to another image; BeamSharedPromptLayer "
                                   "cannot serve it (use DynamicCache.batch_repeat_interleave)")
            self.reordered = True
        generated = slice(self.prompt_len, self.length)
        beam_idx = beam_idx.to(self.keys.device)
        self.keys[:, :, generated] = self.keys[beam_idx, :, generated]
        self.values[:, :, generated] = self.values[beam_idx, :, generated]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BeamSharedPromptLayer serves beam search only")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BeamSharedPromptLayer serves beam search only")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("BeamSharedPromptLayer serves beam search only")
