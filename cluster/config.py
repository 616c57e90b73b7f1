"""The application config: every component's settings composed into one object, read from YAML presets and overrides.

A preset is a YAML file under ``configs/`` (or any path). ``load_config("demo", ["ppo.lr=1e-5"])``
reads it, applies ``section.field=value`` overrides (a mapping-typed field such as ``env.reward``
is replaced, not merged), validates every field with the rules declared beside it, and raises
:class:`ConfigError` naming the field for an unknown key or a bad value. Only entry points (the
command line, the recipes in this package) see the whole config; components get their section.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import annotated_types as at
import yaml
from pydantic import Field, ValidationError, model_validator

from envs.data import REPO_ROOT, DataSettings
from envs.models import ModelSettings
from envs.reward_model import RewardModelSettings
from envs.settings import Settings, describe
from envs.text_env import EnvSettings
from policies.algo import RolloutSettings
from policies.learner import PPOSettings
from serve.app import ServeSettings
from serve.labelling.settings import FeedbackSettings

CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the field."""


class RunSettings(Settings):
    """The ``run`` section: where outputs go, the seed, checkpoints."""

    output_dir: str = "runs/demo"
    """Where metrics, checkpoints, the report and the exported policy go."""
    seed: int = Field(0, ge=0)
    """Seed for prompts, sampling and initialisation."""
    checkpoint_every: int = Field(5, ge=1)
    """Save an RLlib checkpoint every K iterations (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Keep the newest N complete checkpoints of a run (older ones are deleted after each save)."""
    eval_prompts: int = Field(64, ge=1)
    """Held-out prompts used by `eval` and the demo report."""
    torch_threads: int = Field(0, ge=0)
    """torch intra-op threads per process (0 = torch default)."""


class Config(Settings):
    """The whole application config, one section per component."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    """The policy model."""
    data: DataSettings = Field(default_factory=DataSettings)
    """Shipped or user data."""
    reward_model: RewardModelSettings = Field(default_factory=RewardModelSettings)
    """The learned reward model."""
    env: EnvSettings = Field(default_factory=EnvSettings)
    """The text-generation environment."""
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    """PPO and KL control."""
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    """Scaling: EnvRunners, Learners, resources."""
    serve: ServeSettings = Field(default_factory=ServeSettings)
    """HTTP serving."""
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    """Human feedback: the labelling app, its store, iterated rounds."""
    run: RunSettings = Field(default_factory=RunSettings)
    """Output, seed, checkpoints."""

    @model_validator(mode="after")
    def _groups_fit(self) -> Config:
        learners, k = max(self.rollout.num_learners, 1), self.ppo.group_size
        if self.ppo.minibatch_episodes % (learners * k):
            raise ValueError(
                f"ppo.minibatch_episodes ({self.ppo.minibatch_episodes}) must be a multiple of "
                f"rollout.num_learners x ppo.group_size ({learners} x {k}): every Learner takes the "
                "same number of whole groups per step"
            )
        if self.rollout.num_envs_per_env_runner % k:
            raise ValueError(
                f"rollout.num_envs_per_env_runner ({self.rollout.num_envs_per_env_runner}) must be a "
                f"multiple of ppo.group_size ({k}): a group's responses are sampled side by side"
            )
        return self


# ---- errors that name the field ---------------------------------------------------------------

_TYPE_WORDS = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "finite_number": "expected a finite number",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _field(loc: tuple) -> tuple[str, Any]:
    """(dotted name, annotation with its constraints) of the field an error location points into."""
    cls, n = Config, 0
    while n < len(loc) and isinstance(cls, type) and issubclass(cls, Settings) and loc[n] in cls.model_fields:
        cls, n = cls.model_fields[loc[n]].annotation, n + 1
    return ".".join(map(str, loc[:n])), _annotation(loc[:n])


def _annotation(loc: tuple) -> Any:
    """The annotation (with its Field constraints folded in) of the field at loc."""
    cls: Any = Config
    info = None
    for part in loc:
        info = cls.model_fields[part]
        cls = info.annotation
    return typing.Annotated[cls, *info.metadata] if info is not None and info.metadata else cls


def _bounds(tp: Any) -> str:
    """'a number in (0, 1]', 'an integer >= 1', ... from an annotation's constraints."""
    base, meta = (
        (typing.get_args(tp)[0], typing.get_args(tp)[1:]) if typing.get_origin(tp) is typing.Annotated else (tp, ())
    )
    if typing.get_origin(base) is dict:
        return "a mapping of name to " + _bounds(typing.get_args(base)[1])
    lo = next((("(", m.gt) for m in meta if isinstance(m, at.Gt)), None) or next(
        (("[", m.ge) for m in meta if isinstance(m, at.Ge)), None
    )
    hi = next(((")", m.lt) for m in meta if isinstance(m, at.Lt)), None) or next(
        (("]", m.le) for m in meta if isinstance(m, at.Le)), None
    )
    kind = "an integer" if base is int else "a number"
    if lo and hi:
        return f"{kind} in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{kind} {'>' if lo[0] == '(' else '>='} {lo[1]}"
    if hi:
        return f"{kind} {'<' if hi[0] == ')' else '<='} {hi[1]}"
    return kind


def _message(err: dict) -> str:
    """One pydantic error as 'section.field: what it must be, got value'."""
    kind, loc = err["type"], tuple(err["loc"])
    name, tp = _field(loc)
    if kind == "extra_forbidden":
        parent = _annotation(loc[:-1]) if len(loc) > 1 else Config
        return f"unknown key {'.'.join(map(str, loc))} (valid keys: {', '.join(parent.model_fields)})"
    got = f", got {err.get('input')!r}"
    if kind in _BOUNDS:
        return f"{name}: must be {_bounds(tp)}{got}"
    if kind == "literal_error":
        return f"{name}: must be one of {list(typing.get_args(tp))}{got}"
    if kind in _TYPE_WORDS:
        return f"{name}: {_TYPE_WORDS[kind]}{got}"
    return f"{name}: {err['msg'].removeprefix('Value error, ')}"


# ---- presets and overrides ----------------------------------------------------------------------


def _parse_scalar(text: str) -> Any:
    """An override's right-hand side as YAML, so `3`, `1e-5`, `true` and `{a: 1}` work."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; take it as a number
        try:
            return float(value) if any(c in value for c in "eE.") else int(value)
        except ValueError:
            return value
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['ppo.lr=1e-5', 'run.seed=3'] into a nested mapping."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        *sections, leaf = key.strip().split(".")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[leaf] = _parse_scalar(raw)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any], cls: type[Settings] = Config) -> dict[str, Any]:
    """Deep-merge `extra` into a copy of `base`: sections merge, every other field (mappings too) is replaced."""
    out = dict(base)
    for key, value in extra.items():
        info = cls.model_fields.get(key)
        section = info.annotation if info is not None else None
        if (
            isinstance(section, type)
            and issubclass(section, Settings)
            and isinstance(value, dict)
            and isinstance(out.get(key), dict)
        ):
            out[key] = merge(out[key], value, section)
        else:
            out[key] = value
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


def preset_and_overrides(config: str | None, overrides: list[str]) -> tuple[str, list[str]]:
    """Allow overrides without a preset: `alignray train ppo.lr=1e-5` means the demo preset."""
    overrides = list(overrides)
    if config is not None and "=" in config:
        return "demo", [config, *overrides]
    return config or "demo", overrides


def read_preset(preset: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's sections, on top of the preset its ``base:`` key names (``base: demo``), if any."""
    path = preset_path(preset)
    if path in seen:
        raise ConfigError(f"{path}: its base presets form a loop")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    return merge(read_preset(base, (*seen, path)), data) if base else data


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset (name or YAML path; None = defaults), apply overrides, validate everything."""
    data = read_preset(preset) if preset is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_message(err.errors()[0])) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (YAML-ready)."""
    return cfg.model_dump()


def dump_config(cfg: Config) -> str:
    """Render the config as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def field_docs() -> list[tuple[str, Any, str]]:
    """(dotted field, default, docstring) for every field, for `config show --docs`."""
    return list(describe(Config))
