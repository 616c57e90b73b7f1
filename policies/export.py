"""From an RLlib checkpoint (or the live learner) to a plain Hugging Face model directory, and back to a model spec.

The learner's module state holds the policy under ``lm.*`` (and the value head, which is not
exported); the module's settings name the base model spec to rebuild it from.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from envs.models import ModelLoadError, export_pretrained, load_causal_lm
from policies.lm_module import ModuleSettings

MODULE_PATH = Path("learner_group") / "learner" / "rl_module" / "default_policy"
BUILTIN_SPECS = ("smollm2", "tiny")


def policy_from_state(state: dict[str, Any], settings: ModuleSettings, adapter_dir: str | Path | None = None):
    """(HF causal LM, tokenizer) with the policy weights of an LMModule state dict; LoRA adapters merged in.

    With LoRA and `adapter_dir`, the adapter alone is also written there (loadable on its base model with peft,
    or by ``load_causal_lm`` / ``alignray serve`` / ``alignray eval``, which merge it).
    """
    m = settings.model
    model, tok = load_causal_lm(m.policy, m.dtype, m.tiny_vocab_size, lora=m.lora)
    weights = {k[len("lm.") :]: torch.as_tensor(v) for k, v in state.items() if k.startswith("lm.")}
    model.load_state_dict(weights, strict=True)
    if m.lora.rank > 0:
        if adapter_dir is not None:
            model.peft_config["default"].base_model_name_or_path = m.policy
            # Adapters sit on linear layers only; peft's "auto" would ask the Hub whether the base resized its embeddings.
            model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
            tok.save_pretrained(str(adapter_dir))
        model = model.merge_and_unload()
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
    return policy_from_state(state, ModuleSettings.model_validate(ctor["model_config"]["settings"]))


def checkpoint_to_hf(path: str | Path, out_dir: str | Path) -> Path:
    """Export the policy of a checkpoint (or run directory) as an ``AutoModelForCausalLM`` directory."""
    model, tok = policy_from_checkpoint(path)
    return export_pretrained(model, tok, out_dir)


def resolve_policy(model: str) -> tuple[str, str]:
    """(spec that ``load_causal_lm`` takes, a name for it) of whatever names a policy.

    'smollm2' / 'tiny', a Hugging Face directory, a run directory (its exported ``policy/``, else
    its latest checkpoint), an RLlib checkpoint (exported once to ``<checkpoint>/hf_policy``), or a hub id.
    """
    if model in BUILTIN_SPECS:
        return model, model
    path = Path(model).expanduser()
    if (path / "config.json").exists():
        p = path.resolve()
        return str(p), p.parent.name if p.name == "policy" else p.name
    if (path / "policy" / "config.json").exists():
        return str((path / "policy").resolve()), path.resolve().name
    if path.is_dir():
        find_module_dir(path)  # a clear error if it is not a run or checkpoint either
        return str(checkpoint_to_hf(path, path / "hf_policy").resolve()), path.resolve().name
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(
            f"model {model!r}: not a Hugging Face model directory (config.json), a run "
            "directory with an exported policy/, or an RLlib checkpoint"
        )
    return model, model  # a hub id (needs a network)
