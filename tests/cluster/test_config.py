"""Typed config: presets, overrides, round trip and every error path."""

import pytest

from cluster.cli import main
from cluster.config import Config, ConfigError, dump_config, field_docs, load_config, parse_overrides


def test_defaults_and_demo_preset_load():
    cfg = load_config("demo")
    assert isinstance(cfg, Config)
    assert cfg.model.policy == "smollm2"
    assert cfg.reward_model.backbone == "minilm"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("demo", ["ppo.lr=3e-6", "env.reward={gold: 0.5, reward_model: 1.0}", "run.seed=7"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert again.ppo.lr == 3e-6 and again.env.reward == {"gold": 0.5, "reward_model": 1.0}


def test_override_types_are_coerced():
    cfg = load_config(None, ["ppo.iterations=3", "ppo.lr=1e-4", "env.chat_template=false", "ppo.kl_coef=1"])
    assert cfg.ppo.iterations == 3 and cfg.ppo.lr == 1e-4
    assert cfg.env.chat_template is False
    assert isinstance(cfg.ppo.kl_coef, float)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("ppo.nope=1", "unknown key ppo.nope"),
        ("nosection.x=1", "unknown key nosection"),
        ("ppo.lr=-1", "ppo.lr: must be a number > 0"),
        ("ppo.lr=fast", "ppo.lr: expected a number"),
        ("ppo.iterations=2.5", "ppo.iterations: expected an integer"),
        ("ppo.clip_param=1.5", "ppo.clip_param: must be a number in (0, 1)"),
        ("env.chat_template=maybe", "env.chat_template: expected true or false"),
        ("rollout.reward_model_placement=moon", "rollout.reward_model_placement: must be one of"),
        ("rollout.reward_model_num_gpus=-1", "rollout.reward_model_num_gpus: must be a number >= 0"),
        ("rollout.reward_model_resources={rm: -1}", "rollout.reward_model_resources: must be a mapping"),
        ("serve.port=70000", "serve.port"),
        ("ppo.lr=.nan", "ppo.lr: expected a finite number"),
        ("env.reward=3", "env.reward: expected a mapping"),
        ("ppo", "must look like section.field=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert message in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="no config preset or file 'nope'.*demo"):
        load_config("nope")


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("ppo: 3\n")
    with pytest.raises(ConfigError, match="ppo: expected a mapping"):
        load_config(bad)


def test_every_field_has_a_docstring():
    rows = field_docs()
    assert len(rows) > 40
    missing = [name for name, _, doc in rows if not doc.strip()]
    assert missing == []


def test_cli_config_show(capsys):
    assert main(["config", "show", "demo", "ppo.lr=2e-6"]) == 0
    out = capsys.readouterr().out
    assert "lr: 2.0e-06" in out and "policy: smollm2" in out
    assert main(["config", "show", "demo", "ppo.lr=-2"]) == 2
    assert "ppo.lr" in capsys.readouterr().err


def test_an_override_of_every_mapping_field_replaces_the_presets_value(tmp_path):
    import typing

    from envs.settings import Settings

    def mapping_fields(cls, prefix=""):
        for name, info in cls.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, Settings):
                yield from mapping_fields(info.annotation, f"{prefix}{name}.")
            elif typing.get_origin(info.annotation) is dict:
                yield f"{prefix}{name}"

    fields = list(mapping_fields(Config))
    assert {
        "env.reward",
        "rollout.custom_resources_per_env_runner",
        "rollout.custom_resources_per_learner",
        "rollout.reward_model_resources",
    } <= set(fields)
    preset = tmp_path / "p.yaml"
    sections: dict = {}
    for dotted in fields:
        section, name = dotted.split(".")
        sections.setdefault(section, {})[name] = {"gold": 1.0, "old_key": 2.0}
    import yaml

    preset.write_text(yaml.safe_dump(sections))
    cfg = load_config(preset, [f"{dotted}={{gold: 3}}" for dotted in fields])
    for dotted in fields:
        section, name = dotted.split(".")
        assert getattr(getattr(cfg, section), name) == {"gold": 3.0}, dotted


def test_a_preset_builds_on_its_base(tmp_path):
    grpo = load_config("grpo")
    assert grpo.ppo.advantage_estimator == "grpo" and grpo.ppo.group_size == 8
    assert grpo.ppo.iterations == load_config("demo").ppo.iterations and grpo.model.policy == "smollm2"  # from demo
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(ConfigError, match="base presets form a loop"):
        load_config(a)
