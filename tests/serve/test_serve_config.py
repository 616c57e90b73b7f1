"""The cluster Serve config file and the application builder, without starting Ray."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

from cluster.config import ConfigError, load_config
from cluster.serving import application, build_app
from envs.models import ModelLoadError
from policies.export import resolve_policy
from serve.application import deployment_options

CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "manifests" / "serve_config.yaml"


def assert_known_keys(data: dict, schema: type[BaseModel], where: str) -> None:
    """Serve's schemas ignore unknown keys (forward compatibility); a typo here would be silent."""
    unknown = set(data) - set(schema.model_fields)
    assert not unknown, f"{where}: unknown keys {sorted(unknown)}"


def test_serve_config_matches_serves_schema():
    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert_known_keys(raw, ServeDeploySchema, "top level")
    assert_known_keys(raw["http_options"], HTTPOptionsSchema, "http_options")
    (app,) = raw["applications"]
    assert_known_keys(app, ServeApplicationSchema, "application")
    for dep in app["deployments"]:
        assert_known_keys(dep, DeploymentSchema, dep["name"])
        assert_known_keys(dep["ray_actor_options"], RayActorOptionsSchema, dep["name"] + ".ray_actor_options")
        scaling = AutoscalingConfig(**dep["autoscaling_config"])  # forbids unknown keys itself
        assert 1 <= scaling.min_replicas <= scaling.max_replicas and scaling.target_ongoing_requests >= 1
        assert dep["max_ongoing_requests"] >= scaling.target_ongoing_requests
    assert schema.applications[0].import_path == "cluster.serving:build_app"


def test_import_path_and_args_build_the_declared_deployments(tiny_policy_dir, tiny_reward_dir):
    app = yaml.safe_load(CONFIG.read_text())["applications"][0]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder is build_app
    args = {**app["args"], "model": tiny_policy_dir, "reward_model": tiny_reward_dir}
    built = builder(args)
    policy = built._bound_deployment
    reward = policy.init_args[4]._bound_deployment
    assert {policy.name, reward.name} == {d["name"] for d in app["deployments"]}
    assert policy.init_args[2].max_batch_size == 16


def test_build_app_rejects_unknown_args(tiny_policy_dir):
    with pytest.raises(ConfigError, match="unknown application arg 'modle'"):
        build_app({"modle": tiny_policy_dir})


def test_deployment_options_follow_the_config():
    fixed = deployment_options(load_config(None, ["serve.min_replicas=2", "serve.max_replicas=2"]).serve)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    scaled = deployment_options(load_config(None, ["serve.max_replicas=3", "serve.num_cpus_per_replica=2"]).serve)
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
        "look_back_period_s": 30.0,
        "metrics_interval_s": 10.0,
    }
    AutoscalingConfig(**scaled["autoscaling_config"])  # Serve accepts every key
    assert scaled["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    with pytest.raises(ConfigError, match="serve: min_replicas"):
        load_config(None, ["serve.min_replicas=3", "serve.max_replicas=2"])
    with pytest.raises(ConfigError, match="serve: max_ongoing_requests"):
        load_config(None, ["serve.max_ongoing_requests=4"])
    with pytest.raises(ConfigError, match="serve: max_queue"):
        load_config(None, ["serve.max_queue=8"])
    with pytest.raises(ConfigError, match="serve: look_back_period_s"):
        load_config(None, ["serve.look_back_period_s=5"])
    with pytest.raises(ConfigError, match="serve.dtype"):
        load_config(None, ["serve.dtype=int4"])
    with pytest.raises(ConfigError, match="serve.gil_switch_interval_ms"):
        load_config(None, ["serve.gil_switch_interval_ms=0"])


def test_resolve_policy_accepts_model_and_run_directories(tiny_policy_dir, tmp_path):
    assert resolve_policy("smollm2") == ("smollm2", "smollm2")
    assert resolve_policy(tiny_policy_dir) == (str(Path(tiny_policy_dir).resolve()), "tiny-policy")
    run = tmp_path / "my-run"
    (run / "policy").mkdir(parents=True)
    (run / "policy" / "config.json").write_text("{}")
    assert resolve_policy(str(run)) == (str((run / "policy").resolve()), "my-run")
    assert resolve_policy(str(run / "policy"))[1] == "my-run"
    with pytest.raises(ModelLoadError, match="not an alignray run directory or RLlib checkpoint"):
        resolve_policy(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        resolve_policy(str(tmp_path / "missing"))


def test_build_application_checks_the_reward_model_dir(tiny_policy_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="reward model"):
        application(tiny_policy_dir, load_config(), reward_model=str(tmp_path))


def test_openapi_declares_every_error_status_with_the_openai_error_body():
    from serve.app import app

    schema = app.openapi()
    want = {
        ("get", "/healthz"): {"503"},
        ("get", "/v1/models"): {"401"},
        ("get", "/v1/models/{model_id}"): {"401", "404"},
        **{("post", p): {"400", "401", "404", "413", "429"} for p in ("/v1/completions", "/v1/chat/completions")},
        ("post", "/v1/rewards"): {"400", "401", "404", "413"},
    }
    got = {(m, p): set(op["responses"]) - {"200"} for p, ops in schema["paths"].items() for m, op in ops.items()}
    assert got == want  # and no 422: a bad body is a 400 here
    for (method, path), statuses in want.items():
        for status in statuses:
            body = schema["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_a_missing_key_file_fails_at_build(tiny_policy_dir, tmp_path):
    cfg = load_config(None, [f"serve.api_keys_file={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="serve.api_keys_file"):
        application(tiny_policy_dir, cfg)
    (tmp_path / "keys").write_text("k\n")
    application(tiny_policy_dir, load_config(None, [f"serve.api_keys_file={tmp_path / 'keys'}"]))


def test_auto_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    from serve import quantize
    from serve.settings import ServeSettings

    assert ServeSettings().dtype == "auto"
    monkeypatch.setattr(quantize, "native_bf16", lambda: True)
    assert quantize.resolve_dtype("auto") == "bfloat16"
    monkeypatch.setattr(quantize, "native_bf16", lambda: False)
    assert quantize.resolve_dtype("auto") == "float32"
    assert quantize.resolve_dtype("int8") == "int8"  # an explicit dtype is kept
    with pytest.raises(ValueError, match="serve.dtype"):
        quantize.resolve_dtype("float16")
