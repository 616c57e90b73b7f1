"""Typed configuration: nested dataclasses, one docstring per field, YAML presets, overrides.

A preset is a YAML file under ``configs/`` (or any path). ``load_config("demo", ["ppo.lr=1e-5"])``
reads it, applies ``section.field=value`` overrides, checks every type and range, and raises
:class:`ConfigError` naming the field for an unknown key or a bad value.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the field."""


@dataclass
class ModelConfig:
    policy: str = "smollm2"
    """Policy (and reference) model: 'smollm2' (embedded), 'tiny' (random, tests), a local HF directory or a hub id."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Master weight dtype; RLlib syncs weights through NumPy, so keep float32 unless you override state sync."""
    tiny_vocab_size: int = 512
    """Vocabulary size of the tiny test model (only used when policy='tiny')."""


@dataclass
class DataConfig:
    prompts: str = "data/prompts.parquet"
    """Prompt Parquet file (columns: prompt, split); relative paths are resolved against the repo root."""
    preferences: str = "data/preferences.parquet"
    """Preference Parquet file (columns: prompt, chosen, rejected[, split, chosen_score, rejected_score])."""
    max_prompts: int = 0
    """Use only the first N training prompts (0 = all)."""


@dataclass
class RewardModelConfig:
    backbone: str = "minilm"
    """Encoder: 'minilm' (embedded all-MiniLM-L6-v2), 'tiny' (random, tests), a local HF directory or a hub id."""
    path: str = "runs/reward_model"
    """Where `train-rm` writes the trained reward model (HF directory) and `train` reads it."""
    epochs: int = 3
    """Passes over the training pairs."""
    batch_size: int = 128
    """Preference pairs per optimizer step (at least: a prompt's comparisons stay in one step, each response encoded once)."""
    lr: float = 1e-4
    """AdamW learning rate (peak; linear warm-up over the first 10% of steps, then linear decay)."""
    max_length: int = 96
    """Tokens per text fed to the encoder (prompt + response), truncated from the left."""
    include_prompt: bool = False
    """Score prompt + response instead of the response alone."""
    pooling: Literal["mean", "sum"] = "mean"
    """How token states become one vector: 'mean', or 'sum' (strong words are not diluted by length)."""
    max_pairs: int = 0
    """Train on only the first N pairs (0 = all)."""
    score_batch_size: int = 64
    """Texts per forward pass in `score()`."""


@dataclass
class EnvConfig:
    max_new_tokens: int = 24
    """Episode truncation: tokens the policy may write per response."""
    max_prompt_tokens: int = 64
    """Prompts longer than this (in policy tokens, chat template included) are left-truncated."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one (instruct models)."""
    instruction: str = "Continue this movie review in one or two sentences:"
    """Text placed before each prompt inside the user turn (empty = the prompt alone)."""
    reward: dict[str, float] = field(default_factory=lambda: {"reward_model": 1.0})
    """Weighted reward parts: names from envs.rewards.REWARDS ('reward_model', 'gold', 'length', 'eos'), weight each."""
    no_eos_penalty: float = 0.0
    """Added to the reward (use a negative number) when a response is truncated before EOS."""
    reward_normalization: bool = True
    """Standardise reward-model scores with the mean/std measured on the preference data."""


@dataclass
class PPOConfig:
    iterations: int = 20
    """Training iterations (one rollout + one update each)."""
    episodes_per_iteration: int = 64
    """Responses per iteration across all EnvRunners; RLlib counts tokens, so an iteration collects episodes_per_iteration * env.max_new_tokens tokens."""
    minibatch_episodes: int = 16
    """Episodes per SGD minibatch (minibatch_episodes * env.max_new_tokens tokens, not shuffled so episodes pack)."""
    epochs: int = 2
    """SGD passes over each train batch."""
    lr: float = 1e-5
    """Adam learning rate of the policy."""
    vf_lr: float = 1e-3
    """Adam learning rate of the value head (a linear head on the frozen reference model's hidden states)."""
    reference_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Weights of the frozen reference model (KL penalty and value features); bfloat16 halves its memory and, on CPUs with AMX or on GPUs, makes its pass about 3x faster at about 0.03 nats/token of log-prob error."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    clip_param: float = 0.2
    """PPO ratio clip epsilon."""
    vf_clip_param: float = 0.2
    """Value clip around the old value estimate (in reward units)."""
    vf_loss_coeff: float = 0.1
    """Weight of the value loss."""
    entropy_coeff: float = 0.0
    """Weight of the entropy bonus."""
    gamma: float = 1.0
    """Discount factor."""
    lambda_: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Standardise advantages per minibatch."""
    kl_coef: float = 0.05
    """Initial (or fixed) KL-to-reference penalty coefficient."""
    kl_target: float = 4.0
    """Target KL per response in nats for the adaptive controller (0 = fixed coefficient)."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon in episodes (Ziegler et al. 2019)."""
    temperature: float = 1.0
    """Sampling temperature during rollouts."""
    top_k: int = 0
    """Top-k sampling during rollouts (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling during rollouts (1.0 = off)."""


@dataclass
class RolloutConfig:
    num_env_runners: int = 0
    """Remote EnvRunner actors (0 = sample in the driver process)."""
    num_envs_per_env_runner: int = 8
    """Vectorised sub-environments (sequences generated together) per EnvRunner."""
    num_learners: int = 0
    """Remote Learner actors (0 = learn in the driver; 2+ uses torch DDP)."""
    num_gpus_per_learner: float = 0.0
    """GPUs per Learner."""
    num_gpus_per_env_runner: float = 0.0
    """GPUs per EnvRunner."""
    num_cpus_per_env_runner: float = 1.0
    """CPUs per EnvRunner."""
    custom_resources_per_env_runner: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each EnvRunner needs, to pin rollouts to a worker group."""
    custom_resources_per_learner: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each remote Learner needs, to pin learners to a (GPU) worker group."""
    reward_model_placement: Literal["local", "actor"] = "local"
    """Score in each EnvRunner ('local') or in one shared batched Ray actor ('actor') that the driver starts and owns."""
    reward_model_num_gpus: float = 0.0
    """GPUs for the shared reward-model actor (reward_model_placement='actor' only; it asks for no CPU)."""
    reward_model_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources the shared reward-model actor needs, to pin it to a node group ('actor' only)."""
    restart_failed_env_runners: bool = True
    """Restart an EnvRunner that died and carry on with the iteration."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; loopback unless you mean to expose it."""
    port: int = 8000
    """HTTP port."""
    api_key: str = ""
    """Bearer token required on every request when set (or env ALIGNRAY_API_KEY)."""
    max_tokens_limit: int = 256
    """Largest max_tokens a request may ask for."""
    max_request_bytes: int = 1_000_000
    """Largest request body accepted."""
    max_batch_size: int = 16
    """Requests gathered into one batched generation (1 = batching off)."""
    batch_wait_timeout_s: float = 0.05
    """How long a batch waits to fill."""
    min_replicas: int = 1
    """Autoscaling lower bound."""
    max_replicas: int = 1
    """Autoscaling upper bound."""
    target_ongoing_requests: int = 16
    """Autoscaling target of in-flight requests per replica."""
    num_cpus_per_replica: float = 1.0
    """CPUs per model replica."""
    num_gpus_per_replica: float = 0.0
    """GPUs per model replica."""
    max_ongoing_requests: int = 64
    """Requests one replica accepts at once (queued ones included); must be >= max_batch_size for batches to fill."""
    model_name: str = ""
    """Model id clients pass as `model` (empty = the directory name, or 'smollm2')."""


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    """Where metrics, checkpoints, the report and the exported policy go."""
    seed: int = 0
    """Seed for prompts, sampling and initialisation."""
    checkpoint_every: int = 5
    """Save an RLlib checkpoint every K iterations (and at the end)."""
    eval_prompts: int = 64
    """Held-out prompts used by `eval` and the demo report."""
    torch_threads: int = 0
    """torch intra-op threads per process (0 = torch default)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shipped or user data."""
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """The learned reward model."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The text-generation environment."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO and KL control."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Scaling: EnvRunners, Learners, resources."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """HTTP serving."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, seed, checkpoints."""

    def resolve_path(self, path: str) -> Path:
        """Resolve a config path: absolute stays, relative is taken from the repo root if it exists there."""
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists():
            return p
        return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


# Range checks beyond the type: field path -> (predicate, what it must be).
_CHECKS: dict[str, tuple[Any, str]] = {
    "model.tiny_vocab_size": (lambda v: v >= 16, "an integer >= 16"),
    "data.max_prompts": (lambda v: v >= 0, "an integer >= 0"),
    "reward_model.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "reward_model.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "reward_model.lr": (lambda v: v > 0, "a number > 0"),
    "reward_model.max_length": (lambda v: v >= 8, "an integer >= 8"),
    "reward_model.max_pairs": (lambda v: v >= 0, "an integer >= 0"),
    "reward_model.score_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "env.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "env.max_prompt_tokens": (lambda v: v >= 4, "an integer >= 4"),
    "ppo.iterations": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.episodes_per_iteration": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.minibatch_episodes": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.lr": (lambda v: v > 0, "a number > 0"),
    "ppo.grad_clip": (lambda v: v > 0, "a number > 0"),
    "ppo.vf_lr": (lambda v: v > 0, "a number > 0"),
    "ppo.clip_param": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "ppo.vf_clip_param": (lambda v: v > 0, "a number > 0"),
    "ppo.vf_loss_coeff": (lambda v: v >= 0, "a number >= 0"),
    "ppo.entropy_coeff": (lambda v: v >= 0, "a number >= 0"),
    "ppo.gamma": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "ppo.lambda_": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "ppo.kl_coef": (lambda v: v >= 0, "a number >= 0"),
    "ppo.kl_target": (lambda v: v >= 0, "a number >= 0"),
    "ppo.kl_horizon": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.temperature": (lambda v: v > 0, "a number > 0"),
    "ppo.top_k": (lambda v: v >= 0, "an integer >= 0"),
    "ppo.top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "rollout.num_env_runners": (lambda v: v >= 0, "an integer >= 0"),
    "rollout.num_envs_per_env_runner": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.num_learners": (lambda v: v >= 0, "an integer >= 0"),
    "rollout.num_gpus_per_learner": (lambda v: v >= 0, "a number >= 0"),
    "rollout.num_gpus_per_env_runner": (lambda v: v >= 0, "a number >= 0"),
    "rollout.num_cpus_per_env_runner": (lambda v: v >= 0, "a number >= 0"),
    "rollout.custom_resources_per_learner": (lambda v: all(x >= 0 for x in v.values()), "a mapping of resource name to a number >= 0"),
    "rollout.reward_model_num_gpus": (lambda v: v >= 0, "a number >= 0"),
    "rollout.reward_model_resources": (lambda v: all(x >= 0 for x in v.values()), "a mapping of resource name to a number >= 0"),
    "serve.port": (lambda v: 0 <= v <= 65535, "a port number in [0, 65535]"),
    "serve.max_tokens_limit": (lambda v: v >= 1, "an integer >= 1"),
    "serve.max_request_bytes": (lambda v: v >= 1024, "an integer >= 1024"),
    "serve.max_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "serve.batch_wait_timeout_s": (lambda v: v >= 0, "a number >= 0"),
    "serve.min_replicas": (lambda v: v >= 0, "an integer >= 0"),
    "serve.max_replicas": (lambda v: v >= 1, "an integer >= 1"),
    "serve.target_ongoing_requests": (lambda v: v >= 1, "an integer >= 1"),
    "serve.num_cpus_per_replica": (lambda v: v >= 0, "a number >= 0"),
    "serve.num_gpus_per_replica": (lambda v: v >= 0, "a number >= 0"),
    "serve.max_ongoing_requests": (lambda v: v >= 1, "an integer >= 1"),
    "run.seed": (lambda v: v >= 0, "an integer >= 0"),
    "run.checkpoint_every": (lambda v: v >= 1, "an integer >= 1"),
    "run.eval_prompts": (lambda v: v >= 1, "an integer >= 1"),
    "run.torch_threads": (lambda v: v >= 0, "an integer >= 0"),
}


def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: attribute docstring} for a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML/CLI scalars where lossless."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        ktype, vtype = typing.get_args(tp)
        return {_coerce(k, ktype, f"{name}.{k}"): _coerce(v, vtype, f"{name}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (etype,) = typing.get_args(tp)[:1]
        return [_coerce(v, etype, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a nested mapping, checking keys, types and ranges."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (valid keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        tp, path = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, path + ".")
            continue
        kwargs[name] = _coerce(value, tp, path)
        check = _CHECKS.get(path)
        if check and not check[0](kwargs[name]):
            raise ConfigError(f"{path}: must be {check[1]}, got {value!r}")
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse an override's right-hand side as YAML so `3`, `1e-5`, `true` and `{a: 1}` work."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) or value is None:
        return text if value is None else value
    # YAML 1.1 reads "1e-5" as a string; accept it as a float.
    return value


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data[a][b] = value` for `dotted='a.b'`, creating sections as needed."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def _number(text: str) -> Any:
    """Return float(text) when `text` looks like a number YAML left as a string (e.g. '1e-5')."""
    try:
        return float(text) if any(c in text for c in "eE.") else int(text)
    except ValueError:
        return text


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['ppo.lr=1e-5', 'run.seed=3'] into a nested mapping."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        value = _parse_scalar(raw)
        if isinstance(value, str):
            value = _number(value)
        _set_path(out, key.strip(), value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into a copy of `base`; dict-typed leaves (reward weights) are replaced."""
    out = dict(base)
    for k, v in extra.items():
        replace = k in ("reward", "custom_resources_per_env_runner", "reward_model_resources")
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not replace:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_path(preset: str | Path) -> Path:
    """Find a preset by name ('demo') under configs/, or take it as a path to a YAML file."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{preset}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config preset or file {str(preset)!r} (presets: {', '.join(names)})")


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset (name or YAML path; None = defaults), apply overrides, validate everything."""
    data: dict[str, Any] = {}
    if preset is not None:
        path = preset_path(preset)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Return the config as a plain nested dict (YAML-ready)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """Render the config as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """List (dotted field, default, docstring) for every leaf field, for `config show --docs`."""
    rows: list[tuple[str, Any, str]] = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{prefix}{f.name}", default, docs.get(f.name, "")))
    return rows


