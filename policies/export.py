"""From an RLlib checkpoint (or the live learner) to a plain Hugging Face model directory.

The learner's module state holds the policy under ``lm.*`` (and the value head, which is not
exported); the module's ``model_config`` names the base model spec to rebuild it from.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from policies.models import ModelLoadError, export_pretrained, load_causal_lm

MODULE_PATH = Path("learner_group") / "learner" / "rl_module" / "default_policy"


def policy_from_state(state: dict[str, Any], model_config: dict[str, Any]):
    """(HF causal LM, tokenizer) with the policy weights of an LMModule state dict."""
    model, tok = load_causal_lm(model_config["policy"], model_config.get("dtype", "float32"),
                                model_config.get("tiny_vocab_size", 512))
    weights = {k[len("lm."):]: torch.as_tensor(v) for k, v in state.items() if k.startswith("lm.")}
    model.load_state_dict(weights, strict=True)
    return model.eval(), tok


def find_module_dir(path: str | Path) -> Path:
    """The policy module directory inside a checkpoint, or inside a run's latest checkpoint."""
    p = Path(path)
    if (p / MODULE_PATH).exists():
        return p / MODULE_PATH
    ckpts = sorted((p / "checkpoints").glob("iter_*"), key=lambda c: int(c.name.split("_")[1]))
    ckpts = [c for c in ckpts if (c / MODULE_PATH / "module_state.pkl").exists()]
    if ckpts:
        return ckpts[-1] / MODULE_PATH
    raise ModelLoadError(f"{str(p)!r}: not an alignray run directory or RLlib checkpoint")


def policy_from_checkpoint(path: str | Path):
    """(HF causal LM, tokenizer) of the policy saved in a checkpoint or run directory."""
    mdir = find_module_dir(path)
    ctor = pickle.loads((mdir / "class_and_ctor_args.pkl").read_bytes())["ctor_args_and_kwargs"][1]
    state = pickle.loads((mdir / "module_state.pkl").read_bytes())
    return policy_from_state(state, ctor["model_config"])


def checkpoint_to_hf(path: str | Path, out_dir: str | Path) -> Path:
    """Export the policy of a checkpoint (or run directory) as an ``AutoModelForCausalLM`` directory."""
    model, tok = policy_from_checkpoint(path)
    return export_pretrained(model, tok, out_dir)
