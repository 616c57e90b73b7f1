"""The 'tiny' model spec: randomly initialised 2-layer models built from a config, for tests and smoke runs.

A word-level tokenizer of about 50 movie-review words (plus chat special tokens and a chat
template), a Llama causal LM and a BERT encoder on it. Nothing is downloaded or trained.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a film movie was is and but it this I plot acting story great good bad terrible boring "
    "wonderful awful loved hated fun dull best worst scene actor actress director music ending "
    "not very really so too quite . , ! ?"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
SIZE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}


def tokenizer() -> PreTrainedTokenizerFast:
    """A small word-level tokenizer with chat special tokens."""
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.backend_tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    return tok


def _seeded(model_class, config, seed: int):
    """The model built with weights from `seed`, in eval mode, leaving everyone else's random stream where it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class(config).eval()


def causal_lm(
    vocab_size: int = 512, seed: int = 0, config_class=LlamaConfig, model_class=LlamaForCausalLM, **overrides
):
    """(a randomly initialised 2-layer causal LM in eval mode, the tiny tokenizer); vocab padded to `vocab_size`."""
    tok = tokenizer()
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = config_class(
        vocab_size=max(vocab_size, len(tok)),
        num_key_value_heads=2,
        tie_word_embeddings=False,
        **SIZE,
        **ids,
        **overrides,
    )
    model = _seeded(model_class, config, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def encoder(seed: int = 0):
    """(a randomly initialised 2-layer BERT encoder in eval mode, the tiny tokenizer)."""
    tok = tokenizer()
    config = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **SIZE)
    return _seeded(BertModel, config, seed), tok
