"""The language-model policy as an RLlib new-API-stack ``TorchRLModule``.

- EnvRunners (``inference_only``) hold only the causal LM. ``_forward_exploration`` samples the
  next token at the rollout temperature through a private prefix-keyed KV cache and returns only
  ``actions`` and ``action_logp`` (never full-vocabulary logits, which RLlib would store for every
  token of every episode). ``_forward_inference`` decodes greedily.
- The Learner also holds a frozen reference copy of the initial LM (for the KL penalty, in
  ``reference_dtype``) and a value head (``ValueFunctionAPI``). With ``critic='reference'`` the head
  reads the *reference* model's final hidden state: one no-grad reference pass per train batch
  gives both the reference log-probs and the value features (the ``ref_hidden`` column), and the
  critic never pulls on the policy. With ``critic='policy'`` the head reads the policy's own final
  hidden state and its loss trains the shared trunk too. Both live in
  ``get_non_inference_attributes`` so EnvRunners never build or receive them; the reference is
  kept out of ``state_dict`` (it is rebuilt from the model spec). Critic-free estimators build no head.
- With LoRA (``model.lora.rank > 0``) the LM carries peft adapters: the reference is the same
  weights with the adapters disabled (no second copy), and the state EnvRunners receive is the
  adapter weights alone.
- Every log-prob (sampler, learner, reference, evaluation) comes from the model's own forward
  (:func:`policies.packing.packed_logits`, or the KV cache's forward), so a family that transforms
  its logits (Gemma2 soft-capping, Granite scaling) is sampled and trained under one distribution.
  ``_forward_train`` packs each episode's rows into one causal pass with the LM head only on its
  rows; the entropy (a metric unless the entropy bonus is on) has no graph when ``entropy_grad`` is False.

The module's ``model_config`` is ``{"settings": ModuleSettings(...).model_dump()}``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.torch_utils import convert_to_torch_tensor
from torch import nn

from envs.models import ModelSettings, load_causal_lm
from envs.settings import Settings
from policies.kv_cache import PrefixKVCache
from policies.packing import pack_rows, packed_logits
from policies.ppo_math import entropy_from_logp
from policies.sampling import sample_tokens, scaled_logp

LOGP = "logp"
ENTROPY = "entropy"
REF_HIDDEN = "ref_hidden"  # (N, H) float32 final hidden state of the reference model at each row
Critic = Literal["reference", "policy", "none"]


class ModuleSettings(Settings):
    """What the RLModule needs (built by the RLlib adapter from the ``model`` and ``ppo`` sections)."""

    model: ModelSettings
    """The policy model."""
    temperature: float
    """Sampling temperature of rollouts (the learner's log-probs use the same one)."""
    reference_dtype: Literal["float32", "bfloat16"]
    """Weights of the frozen reference model on the Learner."""
    critic: Critic
    """Which final hidden state the value head reads (the frozen reference's or the policy's own), or no value head."""


class LMModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    """Causal LM policy (+ value head and reference model on the Learner)."""

    @override(TorchRLModule)
    def setup(self) -> None:
        super().setup()
        self.settings = ModuleSettings.model_validate(self.model_config["settings"])
        m = self.settings.model
        self.spec = (m.policy, m.dtype, m.tiny_vocab_size)
        self.temperature = self.settings.temperature
        self.lora = m.lora.rank > 0
        self.lm, _ = load_causal_lm(*self.spec, lora=m.lora)
        self._kv = PrefixKVCache()
        self.entropy_grad = True  # the learner turns this off when the entropy bonus is 0
        if self.inference_only:
            self.eval()  # EnvRunners only sample: no train/eval toggling of every submodule per step
            return
        if m.gradient_checkpointing:  # non-reentrant: frozen embeddings (LoRA) need no input-grad hook
            self.lm.activation_checkpointing_enable({"use_reentrant": False})
        if self.settings.critic != "none":
            self.vf_head = nn.Linear(self.lm.config.get_text_config().hidden_size, 1)
            nn.init.zeros_(self.vf_head.weight)
            nn.init.zeros_(self.vf_head.bias)
        if not self.lora:  # with LoRA the reference is the same weights with the adapters off
            ref, _ = load_causal_lm(*self.spec)
            ref = ref.to(getattr(torch, self.settings.reference_dtype)).requires_grad_(False)
            object.__setattr__(self, "_ref_lm", ref.eval())  # not a submodule: no state, no optimizer

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return [name for name in ("vf_head", "_ref_lm") if hasattr(self, name)]

    @override(TorchRLModule)
    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs):
        """With LoRA, what EnvRunners receive is the adapter weights alone (they rebuild the frozen base themselves)."""
        if self.lora and (inference_only or self.inference_only):  # filtered before NumPy: no copy of the base
            return convert_to_numpy({k: v for k, v in self.state_dict().items() if "lora_" in k})
        return super().get_state(components, not_components=not_components, inference_only=inference_only, **kwargs)

    # -- EnvRunner side ------------------------------------------------------------------

    def next_token_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-token logits (B, V) of each slot's context, through the prefix KV cache."""
        obs = batch[Columns.OBS]
        return self._kv.next_logits(self.lm, obs["input_ids"], obs["length"])

    @override(TorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            actions, logp = sample_tokens(self.next_token_logits(batch), self.temperature)
        return {Columns.ACTIONS: actions, Columns.ACTION_LOGP: logp}

    @override(TorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTIONS: self.next_token_logits(batch).argmax(-1)}

    @override(TorchRLModule)
    def set_state(self, state) -> None:
        if self.lora and self.inference_only and state and all("lora_" in k for k in state):
            self.load_state_dict(convert_to_torch_tensor(state), strict=False)  # adapters only, by design
        else:
            super().set_state(state)
        self._kv.clear()  # cached keys/values belong to the old weights

    # -- Learner side --------------------------------------------------------------------

    def _pass(self, lm, batch: dict[str, Any], with_hidden: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of each row's action (N,), tempered log-probs (N, V), final hidden state (N, H) or None)."""
        obs = batch[Columns.OBS]
        logits, hidden = packed_logits(lm, pack_rows(obs["input_ids"], obs["length"]), with_hidden)
        logp_all = scaled_logp(logits, self.temperature)  # (N, V) float32
        actions = batch.get(Columns.ACTIONS)
        logp = None if actions is None else logp_all.gather(-1, actions.long()[:, None]).squeeze(-1)
        return logp, logp_all, hidden

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        logp, logp_all, hidden = self._pass(self.lm, batch, with_hidden=self.settings.critic == "policy")
        with torch.set_grad_enabled(self.entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logp(logp_all)
        out = {LOGP: logp, ENTROPY: entropy}
        if hidden is not None:
            out[Columns.EMBEDDINGS] = hidden
        return out

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        """Value of each row's state (N,): the head on the critic's features (given, in the batch, or from a no-grad pass)."""
        if self.settings.critic == "reference":
            features = batch.get(REF_HIDDEN)
            if features is None:
                features = self.reference_pass(batch)[1]
        else:
            features = embeddings
            if features is None:
                with torch.no_grad():
                    features = self._pass(self.lm, batch, with_hidden=True)[2]
        return self.vf_head(features.float()).squeeze(-1)

    @torch.no_grad()
    def reference_pass(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One packed forward of the frozen reference: (log-prob of each row's action (N,), its float32 hidden state (N, H) when the critic reads it)."""
        with_hidden = self.settings.critic == "reference"
        if self.lora:
            with self.lm.disable_adapter():
                logp, _, hidden = self._pass(self.lm, batch, with_hidden)
        else:
            if self._ref_lm.device != self.lm.device:
                self._ref_lm.to(self.lm.device)
            logp, _, hidden = self._pass(self._ref_lm, batch, with_hidden)
        return logp, None if hidden is None else hidden.float()
