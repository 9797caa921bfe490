"""The toy world's tiny causal LM: a small GPT-2 and a byte-level BPE tokenizer trained on the toy
captions (GPT-2's scheme: exact round trip of any text). scripts/train_toy_lm.py pre-trains it and
saves it as a Hugging Face folder that loads like distilgpt2.

<|endoftext|> is BOS, EOS and document separator, as in GPT-2.
"""
EOT = "<|endoftext|>"


def train_tokenizer(captions, vocab_size=1024):
    """Byte-level BPE trained on captions -> a transformers fast tokenizer (pad token unset, as GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(captions, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def build_toy_lm(tokenizer, n_positions=128, n_layer=3, n_embd=128, n_head=4):
    """A freshly initialised GPT2LMHeadModel over the tokenizer's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eot = tokenizer.eos_token_id
    # GPT-2's tanh GELU as PyTorch's one fused kernel, not transformers' "gelu_new" written out in
    # five elementwise ops: the same function, and a toy stage-2 step is faster for it.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eot, eos_token_id=eot, activation_function="gelu_pytorch_tanh")
    return GPT2LMHeadModel(config)
