"""The KubeRay RayCluster/RayJob and the cluster-launcher YAML: valid, complete, and consistent on paper.

"On paper" means: the resource names, GPU counts and replica bounds in the manifests can host the
scaling fields the RayJob's entrypoint sets (num_env_runners, GPUs and custom resources per
EnvRunner and per Learner), token authentication is on everywhere, and checkpoints go to the
volume every pod mounts. Nothing here talks to Kubernetes or AWS.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from cluster.config import load_config

MANIFESTS = Path(__file__).resolve().parents[2] / "cluster" / "manifests"
GPU = "nvidia.com/gpu"
# CPUs and GPUs of the instance types the launcher YAML uses (AWS).
INSTANCES = {"m5.2xlarge": (8, 0), "g5.2xlarge": (8, 1)}


def load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load("rayjob.yaml")


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load("raycluster.yaml")


@pytest.fixture(scope="module")
def cfg(rayjob):
    """The config the RayJob's entrypoint runs: `python -m cluster.cli train <preset> k=v ...`."""
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "cluster.cli", "train"]
    return load_config(words[4], [w for w in words[5:] if w != "--resume"])


def cluster_specs(raycluster, rayjob):
    return [("RayCluster", raycluster["spec"]), ("RayJob", rayjob["spec"]["rayClusterSpec"])]


def custom_resources(group: dict) -> dict[str, float]:
    """`rayStartParams.resources` is a JSON object wrapped in quotes, KubeRay's format."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources must be quoted JSON: {raw!r}"
    return json.loads(raw[1:-1].replace('\\"', '"'))


def container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def pod_capacity(group: dict) -> dict[str, float]:
    """What Ray will see on one pod of `group`: CPU, GPU and the custom resources."""
    limits = container(group)["resources"]["limits"]
    params = group.get("rayStartParams", {})
    cpus = float(params.get("num-cpus", limits["cpu"]))
    return {"CPU": cpus, "GPU": float(limits.get(GPU, 0)), **custom_resources(group)}


def group_with(spec: dict, resource: str) -> dict:
    groups = [g for g in spec["workerGroupSpecs"] if resource in custom_resources(g)]
    assert len(groups) == 1, f"exactly one worker group must provide the custom resource {resource!r}"
    return groups[0]


def per_pod(capacity: dict[str, float], need: dict[str, float]) -> int:
    """How many actors needing `need` fit on one pod of `capacity`."""
    fits = [math.floor(capacity.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(fits) if fits else 10**9


def env_runner_need(cfg) -> dict[str, float]:
    r = cfg.rollout
    return {"CPU": r.num_cpus_per_env_runner, "GPU": r.num_gpus_per_env_runner, **r.custom_resources_per_env_runner}


def learner_need(cfg) -> dict[str, float]:
    r = cfg.rollout
    cpu = 0.0 if r.num_gpus_per_learner > 0 else 1.0  # RLlib's num_cpus_per_learner="auto"
    return {"CPU": cpu, "GPU": r.num_gpus_per_learner, **r.custom_resources_per_learner}


# --- KubeRay -------------------------------------------------------------------------------
def test_kuberay_headers(raycluster, rayjob):
    for doc, kind in ((raycluster, "RayCluster"), (rayjob, "RayJob")):
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["kind"] == kind
        assert doc["metadata"]["name"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")


def test_kuberay_required_fields(raycluster, rayjob):
    for kind, spec in cluster_specs(raycluster, rayjob):
        assert spec["rayVersion"] == ray.__version__, kind
        head = spec["headGroupSpec"]
        assert container(head)["name"] and container(head)["image"]
        ports = {p["containerPort"] for p in container(head)["ports"]}
        assert {6379, 8265, 10001} <= ports, kind
        names = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert len(names) == len(set(names)) >= 2, kind
        for g in [head, *spec["workerGroupSpecs"]]:
            params = g.get("rayStartParams", {})
            assert all(isinstance(v, str) for v in params.values()), f"{kind}: rayStartParams values must be strings"
            assert container(g)["image"] == container(head)["image"], "one image for every Ray container"
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (kind, g["groupName"])


def test_rayjob_and_raycluster_describe_the_same_cluster(raycluster, rayjob):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


def test_token_auth_on_every_container(raycluster, rayjob):
    pods = [g for _, s in cluster_specs(raycluster, rayjob) for g in [s["headGroupSpec"], *s["workerGroupSpecs"]]]
    pods.append(rayjob["spec"]["submitterPodTemplate"])  # runs `ray job submit`: needs the token too
    for pod in pods:
        tmpl = pod.get("template", pod)
        for c in tmpl["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "alignray-ray-token", "key": "auth_token"}, c["name"]


def test_gpu_settings(raycluster):
    spec = raycluster["spec"]
    head = container(spec["headGroupSpec"])["resources"]
    assert GPU not in head["limits"] and GPU not in head.get("requests", {}), "no GPU on the head"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "keep Learners/EnvRunners off the head"
    for g in spec["workerGroupSpecs"]:
        res = container(g)["resources"]
        if GPU not in res["limits"]:
            continue
        assert res["limits"][GPU] == res["requests"][GPU], "extended resources: requests must equal limits"
        assert float(res["limits"][GPU]).is_integer(), "whole GPUs per pod"
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == GPU for t in tolerations), f"{g['groupName']} must tolerate GPU taints"
        assert "num-gpus" not in g["rayStartParams"], "let KubeRay derive num-gpus from the GPU limit"


def test_env_runners_fit_the_rollout_group(raycluster, cfg):
    spec, r = raycluster["spec"], cfg.rollout
    assert r.custom_resources_per_env_runner, "rollouts must be pinned to a worker group"
    for name in r.custom_resources_per_env_runner:
        group = group_with(spec, name)
        fit = per_pod(pod_capacity(group), env_runner_need(cfg))
        assert fit >= 1, "one EnvRunner must fit on a rollout pod"
        assert math.ceil(r.num_env_runners / fit) <= group["maxReplicas"], "maxReplicas too small for num_env_runners"
        assert r.num_gpus_per_env_runner > 0 and pod_capacity(group)["GPU"] >= 1, "GPU rollouts on a GPU group"


def test_learners_fit_the_learner_group(raycluster, cfg):
    spec, r = raycluster["spec"], cfg.rollout
    assert r.num_learners >= 2 and r.num_gpus_per_learner >= 1, "the GPU layout trains with DDP on whole GPUs"
    assert float(r.num_gpus_per_learner).is_integer(), "DDP (NCCL) learners need whole GPUs"
    for name in r.custom_resources_per_learner:
        group = group_with(spec, name)
        fit = per_pod(pod_capacity(group), learner_need(cfg))
        assert fit >= 1 and fit * group["minReplicas"] >= r.num_learners, "learner pods must always be there"
        assert name not in r.custom_resources_per_env_runner


def test_outputs_on_the_shared_volume(raycluster, cfg):
    spec = raycluster["spec"]
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        mounts = [m["mountPath"] for m in container(g)["volumeMounts"]]
        for path in (cfg.run.output_dir, cfg.reward_model.path):
            assert any(path.startswith(m + "/") for m in mounts), (
                f"{path} not on a volume of {g.get('groupName', 'head')}"
            )


# --- cluster launcher ----------------------------------------------------------------------
def test_launcher_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(load("cluster-launcher.yaml"))))


def test_launcher_schema_check_is_real():
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load("cluster-launcher.yaml")
    broken["available_node_types"]["rollout_gpu"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(broken))


def test_launcher_matches_the_config(cfg):
    launcher = load("cluster-launcher.yaml")
    types, r = launcher["available_node_types"], cfg.rollout

    def node(resource):
        (name,) = [n for n, t in types.items() if resource in t.get("resources", {})]
        t = types[name]
        cpus, gpus = INSTANCES[t["node_config"]["InstanceType"]]
        return t, {"CPU": cpus, "GPU": gpus, **t["resources"]}

    for name in r.custom_resources_per_env_runner:
        t, cap = node(name)
        fit = per_pod(cap, env_runner_need(cfg))
        assert fit >= 1 and math.ceil(r.num_env_runners / fit) <= t["max_workers"]
    for name in r.custom_resources_per_learner:
        t, cap = node(name)
        assert per_pod(cap, learner_need(cfg)) * t["min_workers"] >= r.num_learners
    assert types[launcher["head_node_type"]]["resources"]["CPU"] == 0
    assert sum(t.get("max_workers", 0) for t in types.values()) <= launcher["max_workers"]


def test_launcher_token_auth_and_loopback_dashboard():
    launcher = load("cluster-launcher.yaml")
    head, workers = " ".join(launcher["head_start_ray_commands"]), " ".join(launcher["worker_start_ray_commands"])
    for cmd in (head, workers):
        assert "RAY_AUTH_MODE=token" in cmd
        (path,) = {w.split("=", 1)[1] for w in cmd.split() if w.startswith("RAY_AUTH_TOKEN_PATH=")}
        assert path in launcher["file_mounts"], "the token file must be copied to every node"
    assert "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head


def test_one_image_everywhere(raycluster):
    launcher = load("cluster-launcher.yaml")
    image = container(raycluster["spec"]["headGroupSpec"])["image"]
    assert launcher["docker"]["image"] == image
    dockerfile = (MANIFESTS / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile


def test_every_manifest_is_packaged():
    """pyproject ships cluster/manifests/*.yaml; every manifest must match that pattern."""
    yamls = {p.name for p in MANIFESTS.glob("*.yaml")}
    assert {"raycluster.yaml", "rayjob.yaml", "cluster-launcher.yaml"} <= yamls


# --- metrics: Grafana dashboard and Prometheus alert rules ---------------------------------
PROMQL_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "changes", "abs", "clamp_min", "clamp_max",
    "histogram_quantile", "avg_over_time", "max_over_time", "min_over_time", "by", "without", "ignoring", "on",
    "group_left", "group_right",
}  # fmt: skip
SERVE_BUILTIN = {"ray_serve_deployment_replica_healthy": {"deployment", "application", "replica"}}
"""Ray Serve's own series the manifests use (tests/serve/test_serve_ops.py sees them on a live endpoint)."""
SERVE_LABELS = {"application", "deployment", "replica"}
"""Labels Ray Serve adds to every metric a replica records."""


def exported_series() -> dict[str, set[str]]:
    """Every Prometheus series name the code exports -> the labels it may be filtered by."""
    from cluster.run_log import METRICS as TRAINING
    from cluster.telemetry import metric_name
    from serve.metrics import METRICS, exported_names

    out = dict(SERVE_BUILTIN)
    for name, (kind, _, tags, _) in METRICS.items():
        for series in exported_names(name, kind):
            out[series] = set(tags) | SERVE_LABELS | ({"le"} if series.endswith("_bucket") else set())
    out |= {"ray_" + metric_name(key): set() for key in TRAINING}
    return out


def check_promql(expr: str) -> set[str]:
    """Structural checks of one PromQL expression (promtool is not installed); returns the series it reads."""
    unquoted = re.sub(r'"[^"]*"', '""', expr)
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in unquoted:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} in {expr!r}"
    assert not stack, f"unclosed {stack} in {expr!r}"
    for fn in re.findall(r"\b([a-z_]+)\s*\(", unquoted):
        assert fn in PROMQL_FUNCTIONS, f"unknown function {fn!r} in {expr!r}"
    for window in re.findall(r"\[([^\]]*)\]", unquoted):
        assert re.fullmatch(r"\d+[smhdw]", window), f"bad range [{window}] in {expr!r}"
    series = exported_series()
    used = set(re.findall(r"\b(ray_[a-z0-9_]+)", unquoted))
    for name in used:
        assert name in series, f"{name} is not a series the code exports (serve/metrics.py, cluster/telemetry.py)"
    for name, matchers in re.findall(r"\b(ray_[a-z0-9_]+)\{([^}]*)\}", expr):
        for matcher in matchers.split(","):
            m = re.fullmatch(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"[^"]*"\s*', matcher)
            assert m, f"bad label matcher {matcher!r} in {expr!r}"
            assert m.group(1) in series[name], f"{name} has no label {m.group(1)!r}"
    return used


@pytest.fixture(scope="module")
def alert_rules() -> dict:
    return load("prometheus-alerts.yaml")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((MANIFESTS / "grafana-dashboard.json").read_text())


def test_alert_rules_are_well_formed(alert_rules):
    assert set(alert_rules) == {"groups"}
    names, used = set(), set()
    for group in alert_rules["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Alignray[A-Z]\w+", rule["alert"]) and rule["alert"] not in names
            names.add(rule["alert"])
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            for text in rule["annotations"].values():
                assert text.count("{{") == text.count("}}")
            used |= check_promql(rule["expr"])
    # the four the issue asks for: error rate, p99 latency, queue saturation, reward drift
    assert {"AlignrayHighErrorRate", "AlignrayHighP99Latency", "AlignrayQueueSaturated", "AlignrayRewardDrift"} <= names
    assert {"ray_alignray_requests_total", "ray_alignray_reward_probability_sum"} <= used


def test_grafana_dashboard_is_well_formed(dashboard):
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ids, cells, used = set(), set(), set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids and panel["title"]
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] >= 1 and g["y"] >= 0
        area = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "heatmap", "table"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${" + var["name"] + "}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            used |= check_promql(target["expr"])
    serving = {n for n in used if n.startswith("ray_alignray_") and not n.startswith("ray_alignray_train_")}
    # every serving metric has a panel; the training ones the README's curves show do too
    assert {s.rsplit("_", 1)[0] if s.endswith(("_bucket", "_sum", "_count")) else s for s in serving} >= {
        "ray_alignray_request_latency_seconds",
        "ray_alignray_time_to_first_token_seconds",
        "ray_alignray_generated_tokens_total",
        "ray_alignray_queue_length",
        "ray_alignray_batch_occupancy",
        "ray_alignray_reward_probability",
    }
    assert {"ray_alignray_train_rm_score", "ray_alignray_train_kl_ref", "ray_alignray_train_gold_score"} <= used


def test_promql_checker_catches_mistakes():
    for bad in (
        "sum(rate(ray_alignray_requests_total[5m])",  # unclosed
        "sum(rate(ray_alignray_request_total[5m]))",  # a name the code does not export
        "rate(ray_alignray_requests_total[5 minutes])",
        'sum(ray_alignray_queue_length{route="/v1/completions"})',  # a label it does not have
        "summ(ray_alignray_queue_length)",
    ):
        with pytest.raises(AssertionError):
            check_promql(bad)
