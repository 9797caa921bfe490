"""EVCap-style captioner: Q-Former queries over z, names retrieved from an external visual-name
memory and fused by name queries, all projected into a causal LM behind a chat prompt.

EVCap (Li et al., CVPR 2024) reads an image as

    encode_img:  32 learnable queries --Q-Former, cross-attending to the image tokens--> q_img [B,32,Hq]
                 names retrieved from the memory for the image, de-duplicated, at most topn (10)
                 8 name queries + q_img --fusion Q-Former, the 8 cross-attending to the names--> q_txt [B,8,Hq]
                 proj(cat(q_img, q_txt)) [B,40,E]            (E: the LM's width)
    prompt_wrap: [BOS] "###Human: <Img>" [40 image tokens] "</Img> Describe this image in detail. ###Assistant: "

and the LM continues with the caption and its EOS (trained, so generate() stops by itself; EVCap
stops on "\n" or "."). The image tokens here are z or cond(z) (what the stage-2 captioner reads).
EVCap keys its memory by the frozen BLIP-2 Q-Former's mean output over images of each name; here
the keys live in the frozen stage-1 space, the mean of the image's L tokens of z (or cond(z)),
L2-normalised, one key per memory image (scripts/build_memory.py), so a memory is built once from
a stage-1 checkpoint and stays valid while the captioner trains. The names reach the fusion
Q-Former as the LM's own (frozen) token embeddings, the space the projection writes into, so a
name that no training caption holds is still a known sequence of words (EVCap: BERT embeddings).

By default only the queries and the projection train (EVCap's 3.97M parameters at its size); a
Q-Former is a fresh small config (the toy world has no pretrained one) or any saved
Blip2QFormerModel folder. Generation: the prefix captioner's batched, cached
generate(inputs_embeds=...) (every prefix has the same length), not EVCap's batch-1 beam search.
"""
import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import BadInput
from models.emb_to_caption import EmbToCaption, _load_lm, pad_ids, rms_noised

PROMPT = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
IMAGE_SLOT = "<ImageHere>"
# names_in_prompt (ViECap's entity-aware hard prompt, Fei et al., ICCV 2023): the retrieved names
# also as words in the prompt, which a fine-tuned LM learns to copy, where the fused name queries
# give it only a projection to decode.
NAMES_SLOT = "<Names>"
# Relation words after which the second-mentioned object is the left or top one ("A right of B").
SECOND_FIRST = re.compile(r"\b(right of|below|under|beneath|underneath)\b")
PROMPT_WITH_NAMES = "###Human: <Img><ImageHere></Img> There are <Names> in the image. ###Assistant: "


# ---- the visual-name memory ---------------------------------------------------------------------
def memory_key(x):
    """x [B,L,D] (z or cond(z)) -> [B,D]: the memory's key space, the L2-normalised token mean."""
    return F.normalize(x.float().mean(dim=1), dim=-1)


def memory_paths(path):
    """memory.safetensors -> (it, memory.json beside it)."""
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    return stem + ".safetensors", stem + ".json"


def load_memory(path):
    """-> (keys [M,D] float32, names [M], info dict) of a memory written by scripts/build_memory.py."""
    from safetensors.torch import load_file
    keys_path, names_path = memory_paths(path)
    hint = "build one with `python scripts/build_memory.py --stage1_ckpt ... --images_dir DIR --out PATH`"
    for p in (keys_path, names_path):
        if not os.path.isfile(p):
            raise BadInput(f"--memory {path}: {p} does not exist; {hint}")
    try:
        keys = load_file(keys_path)["keys"].float()
        with open(names_path) as f:
            info = json.load(f)
        names = info["names"]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise BadInput(f"--memory {path}: not a visual-name memory ({type(e).__name__}: {e}); {hint}") from None
    if keys.dim() != 2 or len(names) != keys.shape[0]:
        raise BadInput(f"--memory {path}: {keys.shape[0] if keys.dim() else 0} keys but {len(names)} names; {hint}")
    return keys, names, info


def region_views(images, regions):
    """images [B,3,H,W] in [0,1] -> [B,4*regions,3,H,W]: for each of `regions` lines across the width
    (evenly in its middle quarter, 3/8 to 5/8; one line: the middle), then across the height, the
    image with the far side of the line painted in its background colour (the median of its border
    pixels), then with the near side painted. Each view of a two-object scene cut between its
    objects shows one object where it stood, as the memory's one-object images do."""
    B, _, H, W = images.shape
    lines = [0.5] if regions == 1 else torch.linspace(0.375, 0.625, regions).tolist()
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 0], images[..., -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]                 # [B,3,1,1]
    views = []
    for size, shape in ((W, (1, 1, 1, W)), (H, (1, 1, H, 1))):
        for line in lines:
            near = (torch.arange(size, device=images.device) < round(line * size)).view(shape).to(images.dtype)
            views += [images * near + background * (1 - near), images * (1 - near) + background * near]
    return torch.stack(views, dim=1)


class NameMemory(nn.Module):
    """Names and their keys; retrieve() gives each image its nearest names by cosine similarity,
    retrieve_regions() the names of its regions (regions > 0: VLV.caption asks for them)."""

    def __init__(self, keys=None, names=(), topn=10, search_k=32, backend="torch", info=None, regions=0):
        super().__init__()
        self.info = info or {}  # what build_memory.py recorded: space, stage-1 checkpoint and fingerprint
        if backend not in ("torch", "faiss"):
            raise BadInput(f"memory backend {backend!r}: use 'torch' or 'faiss'")
        if not isinstance(regions, int) or regions < 0:
            raise BadInput(f"memory regions {regions!r}: the number of split lines an axis, 0 (whole images) or more")
        self.names, self.topn, self.search_k, self.backend = list(names), topn, search_k, backend
        self.regions = regions
        self.register_buffer("keys", torch.zeros(0, 1), persistent=False)  # the memory file holds them
        self._index = None
        if keys is not None:
            self.set_keys(keys)

    def set_keys(self, keys):
        """keys [M,D], one per memory entry (names[i] names keys[i]): those of the memory file, or (train_stage2.py
        re-keys the memory of a captioner that fine-tunes its encoder) of the same images by the fine-tuned encoder."""
        if keys.dim() != 2 or keys.shape[0] != len(self.names):
            raise BadInput(f"{tuple(keys.shape)} memory keys for {len(self.names)} memory entries: "
                           "give one key per entry")
        self.keys = F.normalize(keys.float(), dim=-1).to(self.keys.device)
        self._index = None
        if self.backend == "faiss" and len(self.names):
            try:
                import faiss
            except ImportError:
                raise BadInput("memory backend faiss: faiss is not installed; `pip install faiss-cpu`, or use "
                               "the torch backend (the default)") from None
            self._index = faiss.IndexFlatIP(self.keys.shape[1])  # inner product of unit vectors = cosine
            self._index.add(self.keys.cpu().numpy())

    def __len__(self):
        return len(self.names)

    @torch.no_grad()
    def retrieve(self, x):
        """x [B,L,D] -> per image, up to topn names, most similar first, each once (EVCap searches
        more neighbours than it keeps, since several keys may share a name)."""
        if not len(self.names):
            return [[] for _ in range(x.shape[0])]
        query = memory_key(x)
        if query.shape[1] != self.keys.shape[1]:
            raise BadInput(f"the memory's keys are {self.keys.shape[1]} wide, the captioner's input {query.shape[1]}; "
                           f"build the memory from the same stage-1 encoder and --prefix_source")
        k = min(self.search_k, len(self.names))
        if self._index is not None:
            _, index = self._index.search(query.cpu().numpy(), k)
            index = torch.from_numpy(index)
        else:
            index = (query @ self.keys.T).topk(k, dim=1).indices.cpu()   # [B,k], most similar first
        out = []
        for row in index.tolist():
            names = list(dict.fromkeys(self.names[i] for i in row))      # de-duplicated, order kept
            out.append(names[:self.topn])
        return out

    def names_by_regions(self, images, x, embed):
        """images [B,3,H,W] and x [B,L,D], their tokens in the memory's space -> retrieve_regions' names,
        the region views put through embed ([N,3,H,W] -> [N,L,D] in the same space)."""
        views = region_views(images, self.regions)                                  # [B,V,3,H,W]
        return self.retrieve_regions(x, embed(views.flatten(0, 1)).unflatten(0, views.shape[:2]))  # [B,V,L,D]

    @torch.no_grad()
    def retrieve_regions(self, x, views):
        """x [B,L,D]: the images; views [B,V,L,D]: their region_views, in the same space -> per image,
        the nearest names of two complementary views, in the views' order (left or top first), where
        that pair matches the memory better than the whole image does (the weaker view's nearest key
        nearer than the image's), else retrieve(x)'s names.

        EVCap retrieves by the whole image; a two-object scene's key then lies near neither of its
        names (on the toy world both are right for 0.05 of them), where a view cut between the
        objects lies near its one object's keys. A one-object image's whole key is nearer than its
        views' (one of each pair is background alone). Exhaustive search over the keys, as the
        torch backend's: each view needs only its nearest key."""
        whole = self.retrieve(x)
        if not len(self.names):
            return whole
        B, V = views.shape[:2]
        nearest = (memory_key(views.flatten(0, 1)) @ self.keys.T).max(dim=1)      # [B*V] over the keys
        sims, keys = nearest.values.view(B, V // 2, 2), nearest.indices.view(B, V // 2, 2)
        pair_sim, pair = sims.min(dim=2).values.max(dim=1)                         # [B]: the best pair
        whole_sim = (memory_key(x) @ self.keys.T).amax(dim=1)                       # [B]
        out = []
        for b in range(B):
            names = [self.names[i] for i in keys[b, pair[b]].tolist()]
            out.append(names if pair_sim[b] > whole_sim[b] and names[0] != names[1] else whole[b])
        return out


# ---- the captioner ------------------------------------------------------------------------------
def name_matcher(names):
    """-> ({lower-case name: name}, a regex of the names as whole words or their plurals, any case;
    None for no names). A longer name comes before one it holds ("hot dog", "dog"), so that a
    search finds the leftmost longest name at each place."""
    name_of = {n.lower(): n for n in names}
    vocab = sorted(name_of, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, vocab)) + r")(?:e?s)?\b", re.IGNORECASE) if vocab else None
    return name_of, pattern


def names_said(names, captions):
    """The names (of `names`) that any of the captions says, sorted: e.g. a memory's names that its
    training captions hold, the pairs they do not being held out."""
    name_of, pattern = name_matcher(names)
    return sorted({name_of[m.group(1).lower()] for c in captions for m in pattern.finditer(c)} if pattern else ())


def additive_mask(mask, dtype):
    """[B,T] 1 = attend -> [B,1,1,T]: 0 where attended, the dtype's minimum where not (what both the
    eager and the SDPA attention of transformers add to the scores)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask == 0, torch.finfo(dtype).min)[:, None, None, :]


def qformer_config(hidden, layers, heads, encoder_width, text_input=False):
    """A BLIP-2 Q-Former config (cross-attention every 2nd layer, as BLIP-2's)."""
    from transformers import Blip2QFormerConfig
    return Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=4 * hidden, encoder_hidden_size=encoder_width,
                              cross_attention_frequency=2, use_qformer_text_input=text_input)


class EVCap(EmbToCaption):
    """z [B,L,D] -> caption: encode_img (Q-Former, memory, fusion, projection), prompt_wrap, the LM.
    The LM, tokenizer, EOS handling, loss and generate() are the prefix captioner's."""

    kind = "evcap"

    def __init__(self, lm, tokenizer, config, qformer, fusion, memory):
        super().__init__(lm, tokenizer, dict(config, proj="linear"), proj_in=qformer.config.hidden_size)
        self.config = config
        self.qformer, self.fusion, self.memory = qformer, fusion, memory
        hidden = qformer.config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, config["num_query_tokens"], hidden) * 0.02)
        self.name_queries = nn.Parameter(torch.randn(1, config["num_name_queries"], hidden) * 0.02)
        self.prompt_ids = self.split_prompt(config["prompt"])
        self.name_tokens = config["name_tokens"] if config.get("names_in_prompt") else 0
        self.prefix_positions = (sum(len(x) for x in self.prompt_ids) + config["num_query_tokens"]
                                 + config["num_name_queries"] + self.name_tokens)
        self.name_of, self.name_pattern = name_matcher(memory.names)

    @classmethod
    def from_pretrained(cls, llm, prefix_len, prefix_dim, memory=None, qformer=None, qformer_hidden=768,
                        qformer_layers=12, qformer_heads=12, num_query_tokens=32, num_name_queries=8, topn=10,
                        search_k=32, memory_backend="torch", freeze_qformer=True, freeze_lm=True, prompt=None,
                        names_in_prompt=False, name_tokens=32, train_names="memory", name_mask=0.4,
                        image_noise_std=0.0, name_swap=0.0, swap_names=None, shuffle_names=False,
                        memory_fingerprint=None, memory_regions=0, spatial_names=False,
                        dtype=torch.float32) -> "EVCap":
        """llm: a causal LM (hub id or folder). memory: a build_memory.py file or None (no names);
        memory_fingerprint, when given, must be its fingerprint (a checkpoint's config records it).
        qformer: a saved Blip2QFormerModel folder, or None for a fresh one of qformer_hidden/layers/
        heads. freeze_qformer=False trains both Q-Formers; freeze_lm=False the LM. names_in_prompt:
        the names also as words, at the prompt's <Names>, in a slot of name_tokens tokens.
        train_names="caption": the loss gives each image the memory's names its captions say, each
        dropped with probability name_mask (ViECap's entity masking, 0.4), instead of the retrieved ones;
        image_noise_std: and z noised by that multiple of its RMS element while training. name_swap:
        the probability that one of an image's names is swapped, in its prompt and its captions alike,
        for another of swap_names (default: the memory's), so the LM learns to write the names it is
        handed over the pair the image shows (counterfactual pairs). shuffle_names: each image's names
        in a random order while training, not its captions' (at inference the memory's order says
        nothing of the caption's). memory_regions: at inference, names retrieved by region views
        (NameMemory.retrieve_regions, that many split lines an axis) instead of the whole image.
        spatial_names: with train_names="caption", two names in the order the image places them (left or
        top first, spatial_order), the order region views hand them at inference."""
        from transformers import Blip2QFormerModel
        prompt = prompt or (PROMPT_WITH_NAMES if names_in_prompt else PROMPT)
        if prompt.count(IMAGE_SLOT) != 1:
            raise BadInput(f"prompt {prompt!r} must hold {IMAGE_SLOT} once: where the image tokens go")
        if names_in_prompt != (NAMES_SLOT in prompt) or prompt.count(NAMES_SLOT) > 1 or (
                names_in_prompt and prompt.index(NAMES_SLOT) < prompt.index(IMAGE_SLOT)):
            raise BadInput(f"prompt {prompt!r}: with names_in_prompt it must hold {NAMES_SLOT} once, after "
                           f"{IMAGE_SLOT}, and without it none")
        if names_in_prompt and (name_tokens or 0) < 1:
            raise BadInput(f"name_tokens {name_tokens}: the names' slot needs at least 1 token")
        if train_names not in ("memory", "caption"):
            raise BadInput(f"train_names {train_names!r}: use 'memory' (the retrieved names) or 'caption'")
        if train_names == "caption" and not 0 <= name_mask < 1:
            raise BadInput(f"name_mask {name_mask}: a probability in [0, 1)")
        for flag, value in (("image_noise_std", image_noise_std), ("name_swap", name_swap),
                            ("shuffle_names", shuffle_names)):
            if value and train_names != "caption":
                raise BadInput(f"{flag} acts on the names the captions say: set train_names='caption'")
        if spatial_names and (train_names != "caption" or shuffle_names):
            raise BadInput("spatial_names orders the names its captions say: set train_names='caption', without "
                           "shuffle_names")
        if memory_regions and train_names != "caption":
            raise BadInput(f"memory_regions {memory_regions}: region retrieval reads the images, which the loss's "
                           f"retrieval does not see; set train_names='caption' (the loss hands the captions' names)")
        if not 0 <= name_swap < 1:
            raise BadInput(f"name_swap {name_swap}: a probability in [0, 1)")
        if min(num_query_tokens, num_name_queries, topn, search_k) < 1:
            raise BadInput("num_query_tokens, num_name_queries, topn and search_k must be 1 or more")
        if qformer is None and qformer_hidden % qformer_heads:
            raise BadInput(f"qformer_hidden {qformer_hidden} is not a multiple of qformer_heads {qformer_heads}")
        lm, tokenizer = _load_lm(llm, dtype)
        width = lm.get_input_embeddings().embedding_dim
        if qformer is None:
            image_qformer = Blip2QFormerModel(qformer_config(qformer_hidden, qformer_layers, qformer_heads, prefix_dim))
        else:
            try:
                image_qformer, info = Blip2QFormerModel.from_pretrained(qformer, output_loading_info=True)
            except (OSError, ValueError) as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BadInput(f"--qformer {qformer}: not a saved Blip2QFormerModel ({reason}); pass its folder or "
                               f"leave --qformer out for a fresh one") from None
            if info["missing_keys"]:  # e.g. a whole BLIP-2 folder, whose keys sit under qformer.
                raise BadInput(f"--qformer {qformer}: {len(info['missing_keys'])} Q-Former weights are not in it (e.g. "
                               f"{sorted(info['missing_keys'])[0]}); save the Q-Former alone (blip2.qformer."
                               f"save_pretrained(DIR)) and pass DIR")
            if image_qformer.config.encoder_hidden_size != prefix_dim:
                raise BadInput(f"--qformer {qformer} reads {image_qformer.config.encoder_hidden_size}-wide image tokens; "
                               f"the captioner's input is {prefix_dim} wide")
        c = image_qformer.config
        # EVCap's fusion Q-Former is its own (frozen) module: the same shape, reading the names.
        fusion = Blip2QFormerModel(qformer_config(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                                                  width, text_input=True))
        keys, names, info = load_memory(memory) if memory else (None, (), {})
        if memory_fingerprint and info.get("fingerprint") != memory_fingerprint:
            raise BadInput(f"memory {memory} is not the one this captioner was trained with (its keys or names "
                           f"changed since); rebuild that memory or retrain the captioner")
        config = dict(llm=llm, prefix_len=prefix_len, prefix_dim=prefix_dim, memory=memory,
                      memory_fingerprint=info.get("fingerprint"), qformer=qformer, qformer_hidden=c.hidden_size,
                      qformer_layers=c.num_hidden_layers, qformer_heads=c.num_attention_heads,
                      num_query_tokens=num_query_tokens, num_name_queries=num_name_queries, topn=topn,
                      search_k=search_k, memory_backend=memory_backend, freeze_qformer=freeze_qformer,
                      freeze_lm=freeze_lm, prompt=prompt, names_in_prompt=names_in_prompt, name_tokens=name_tokens,
                      train_names=train_names, name_mask=name_mask if train_names == "caption" else None,
                      image_noise_std=image_noise_std, name_swap=name_swap, shuffle_names=shuffle_names,
                      swap_names=sorted(set(swap_names if swap_names is not None else names)) if name_swap else None,
                      memory_regions=memory_regions, spatial_names=spatial_names)
        if name_swap and len(config["swap_names"]) < 2:
            raise BadInput(f"name_swap needs at least 2 names to swap between; it has {config['swap_names']}")
        names = NameMemory(keys, names, topn, search_k, memory_backend, info, memory_regions)
        model = cls(lm, tokenizer, config, image_qformer, fusion, names)
        lm.requires_grad_(not freeze_lm)
        image_qformer.requires_grad_(not freeze_qformer)
        fusion.requires_grad_(not freeze_qformer)
        return model

    def saved_parameters(self):
        """The trained parameters, and the Q-Formers when they are freshly initialised: frozen, but
        no file but the checkpoint holds them (EVCap's own fusion Q-Former is reproducible only by
        its seed)."""
        fresh = ("fusion.",) + (("qformer.",) if self.config["qformer"] is None else ())
        return {name: p for name, p in self.named_parameters() if p.requires_grad or name.startswith(fresh)}

    # ---- EVCap's two steps ------------------------------------------------------------------
    def name_embeds(self, names):
        """[[name, ...]] per image -> (the LM's embeddings of "name, name, ..." [B,T,E], mask [B,T]).
        An image with no names (an empty memory) reads one EOS embedding: the fusion Q-Former's
        cross-attention needs a key."""
        ids = [self.tokenizer(", ".join(n), add_special_tokens=False)["input_ids"] or [self.eos_id] for n in names]
        tokens, mask = pad_ids(ids, self.pad_id, self.query_tokens.device)
        with torch.no_grad():  # a fixed lookup, as EVCap's frozen text embeddings
            return self.embed_tokens(tokens), mask

    def name_slot_ids(self, names):
        """[[name, ...]] per image -> [B, name_tokens] ids of "name, name, ...": the names that fit
        whole, most similar first, left-padded with the pad token. Every row has one length, so
        batched generation needs no mask and a row's positions are those it trained with (the
        fine-tuned LM learns to read past the padding)."""
        rows = []
        for row in names:
            ids = []
            for k in range(len(row), 0, -1):
                ids = self.tokenizer(", ".join(row[:k]), add_special_tokens=False)["input_ids"]
                if len(ids) <= self.name_tokens:
                    break
            ids = ids if len(ids) <= self.name_tokens else []
            rows.append([self.pad_id] * (self.name_tokens - len(ids)) + ids)
        return torch.tensor(rows, dtype=torch.long, device=self.query_tokens.device)

    def encode_img(self, z, names=None):
        """z [B,L,D] -> (the image's 40 LM-width tokens [B,Q+N,E], their attention mask [B,Q+N]).
        names: the memory's names per image (default: retrieved here)."""
        if z.dim() != 3 or z.shape[1:] != (self.config["prefix_len"], self.config["prefix_dim"]):
            raise ValueError(f"z has shape {tuple(z.shape)}; expected [B, {self.config['prefix_len']}, "
                             f"{self.config['prefix_dim']}]")
        B = z.shape[0]
        q_img = self.qformer(query_embeds=self.query_tokens.expand(B, -1, -1),
                             encoder_hidden_states=z).last_hidden_state            # [B,32,Hq]
        names, name_mask = self.name_embeds(self.memory.retrieve(z) if names is None else names)  # [B,T,E]
        stream = torch.cat([self.name_queries.expand(B, -1, -1), q_img], dim=1)    # [B,8+32,Hq]
        q_txt = self.fusion(query_embeds=stream, query_length=self.config["num_name_queries"],
                            encoder_hidden_states=names,
                            # [B,1,1,T], additive: broadcast over the 8 queries that cross-attend (a
                            # 2D mask is expanded to all 40 rows of the stream and no longer fits)
                            encoder_attention_mask=additive_mask(name_mask, stream.dtype)
                            ).last_hidden_state[:, :self.config["num_name_queries"]]  # [B,8,Hq]
        embeds = self.proj(torch.cat([q_img, q_txt], dim=1).to(self.proj_dtype))   # [B,40,E]
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=z.device)

    def prompt_wrap(self, img_embeds, atts_img, prompt=None, names=None):
        """EVCap's: the image tokens [B,Q,E] inside the prompt (default the config's; one text for
        every row, so no padding) -> (embeds [B,P,E] in the LM's dtype, attention mask [B,P]).
        The BOS token, when the LM has one, opens the prompt (EVCap prepends it in forward). A
        prompt with <Names> takes each row's names (name_slot_ids) there."""
        weight = self.lm.get_input_embeddings().weight
        B, device = img_embeds.shape[0], img_embeds.device
        pieces = [self.embed_tokens(torch.tensor(x, dtype=torch.long, device=device)).expand(B, -1, -1)
                  for x in (self.prompt_ids if prompt is None else self.split_prompt(prompt))]
        parts = [pieces[0], img_embeds.to(weight.dtype), pieces[1]]
        if len(pieces) == 3:
            if names is None:
                raise ValueError(f"the prompt holds {NAMES_SLOT}: pass the names of each image")
            parts += [self.embed_tokens(self.name_slot_ids(names)), pieces[2]]
        atts = [atts_img.new_ones(B, p.shape[1]) for p in parts]
        atts[1] = atts_img
        return torch.cat(parts, dim=1), torch.cat(atts, dim=1)

    def split_prompt(self, prompt):
        """-> (BOS + ids of the text before <ImageHere>, ids of the text after it), or with <Names>
        after it, (..., ids between the two slots, ids after <Names>)."""
        before, after = prompt.split(IMAGE_SLOT)
        texts = [before, *after.split(NAMES_SLOT)]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts]
        return [([self.bos_id] if self.bos_id is not None else []) + ids[0], *ids[1:]]

    def prefix_embeds(self, z, names=None):
        """z [B,L,D] -> the LM's input before the caption [B,P,E] (what the prefix captioner's
        loss and generate() read; every row has the same length, so the mask is all ones).
        names: each image's names (default: the memory's, retrieved)."""
        names = self.memory.retrieve(z) if names is None else names
        return self.prompt_wrap(*self.encode_img(z, names), names=names)[0]

    def caption_names(self, caption):
        """The memory's names the caption says, in its order, each once (ViECap's entities: the
        caption's nouns that are in the vocabulary; here the vocabulary is the memory's names)."""
        if self.name_pattern is None:
            return []
        return list(dict.fromkeys(self.name_of[m.group(1).lower()] for m in self.name_pattern.finditer(caption)))

    def loss_inputs(self, z, captions, groups=None):
        """(The prefix the loss reads, the captions it scores). train_names="caption" (ViECap's
        recipe): each image gets the names its own captions say (with groups, all its references',
        in order of first mention), each dropped with probability name_mask while training, so the LM
        learns to copy the names it is handed, and not to lean on them alone; at inference the memory
        retrieves them. With image_noise_std, z is noised too while training; with name_swap, one of
        an image's names is swapped for another in its prompt and its captions alike."""
        if self.config.get("train_names", "memory") != "caption":
            return self.prefix_embeds(z), captions
        owners = list(range(len(captions))) if groups is None else groups.tolist()
        rows, first = [[] for _ in range(z.shape[0])], {}
        for owner, caption in zip(owners, captions):
            rows[owner] += self.caption_names(caption)
            first.setdefault(owner, caption)  # each image's first caption says where its objects are
        names = [list(dict.fromkeys(row)) for row in rows]
        if self.config.get("spatial_names"):
            names = [self.spatial_order(row, first.get(k, "")) for k, row in enumerate(names)]
        if self.training and self.config.get("shuffle_names"):
            # In their captions' order the names tell the LM which object comes first, and it writes them
            # so; the memory's order at inference tells nothing, and the relation came out at chance.
            names = [[row[i] for i in torch.randperm(len(row)).tolist()] for row in names]
        swapped = [None] * len(names)
        if self.training and self.config.get("name_swap"):
            names, captions, swapped = self.swap_names(names, captions, owners)
        if self.training and self.config["name_mask"]:
            # a swapped-in name stays: the image cannot say it in its place
            keep = iter((torch.rand(sum(map(len, names))) >= self.config["name_mask"]).tolist())
            names = [[n for n in row if next(keep) or n == new] for row, new in zip(names, swapped)]
        if self.training and self.config.get("image_noise_std"):
            # ViECap's decoder reads a noised embedding (CapDec's) beside its hard prompt: with the
            # image made unsure, the names are the evidence to copy, also a pair no caption held.
            z = rms_noised(z, self.config["image_noise_std"])
        return self.prefix_embeds(z, names), captions

    def spatial_order(self, names, caption):
        """Two names -> left or top first, as the caption's relation words between them place them ("a
        red circle right of a blue square": blue square, red circle); other counts as they are. Region
        views hand two names so (NameMemory.retrieve_regions), so an LM trained on this order reads the
        relation's direction from it and only its axis from the image."""
        if len(names) != 2:
            return names
        spans = list(self.name_pattern.finditer(caption))
        if len(spans) < 2:
            return names
        between = caption[spans[0].end():spans[1].start()].lower()
        said = [self.name_of[m.group(1).lower()] for m in spans[:2]]
        if set(said) != set(names):
            return names
        return said[::-1] if SECOND_FIRST.search(between) else said

    def swap_names(self, names, captions, owners):
        """Counterfactual pairs: with probability name_swap, one name of an image (drawn at random)
        is replaced by a different one of swap_names (none of its others), in its names and every
        caption of it, so that the image no longer says what the caption writes there and only the
        prompt does; an LM trained so copies the names it is handed, a pair no caption held among
        them, and reads the objects it is not handed from the image (its other names stay, and may
        be masked). -> (names, captions, the swapped-in name per image or None). torch's RNG draws,
        so a resumed run draws the same."""
        vocab = self.config["swap_names"]
        swap = (torch.rand(len(names)) < self.config["name_swap"]).tolist()
        maps, swapped = [], []
        for k, row in enumerate(names):
            pool = [n for n in vocab if n not in row] if swap[k] and row else []
            if pool:
                old = row[int(torch.randint(len(row), ()))]
                new = pool[int(torch.randint(len(pool), ()))]
                names[k] = [new if n == old else n for n in row]
            maps.append({old: new} if pool else {})
            swapped.append(new if pool else None)

        def rewrite(mapping, caption):
            def one(m):  # the name, and its plural ending if any
                to = mapping.get(self.name_of[m.group(1).lower()])
                return m.group(0) if to is None else to + m.group(0)[len(m.group(1)):]
            return self.name_pattern.sub(one, caption)

        captions = [rewrite(maps[o], c) if maps[o] else c for o, c in zip(owners, captions)]
        return names, captions, swapped
