"""Deploying the labelling app with the policy deployment (its own application) and the reward deployment.

Serve allows one FastAPI ingress per application and ``PolicyServer`` is one, so the policy runs
as a second application with no HTTP route (``<name>-policy``), and the app reaches it through a
deployment handle; the reward deployment is bound into the app's own application.
"""

from __future__ import annotations

from envs.models import ModelSettings
from envs.reward_model import RewardModel, RewardModelSettings
from serve.app import ServeSettings
from serve.application import build_application
from serve.labelling.app import LabelApp
from serve.labelling.candidates import GenerationSpec
from serve.labelling.settings import FeedbackSettings
from serve.rewards import RewardScorer


def build_label_application(
    feedback: FeedbackSettings,
    db_url: str,
    admin_key: str,
    serve_settings: ServeSettings,
    policy_app: str | None = None,
    spec: GenerationSpec | None = None,
    reward_model: str | None = None,
    round_: int = 0,
    max_items: int = 0,
    torch_threads: int = 0,
):
    """The app's Serve application; it generates items from the application `policy_app` (with `spec`) when given."""
    if policy_app is not None and spec is None:
        raise ValueError("generating items from a policy needs a GenerationSpec")
    reward = None
    if reward_model:
        path = RewardModel.check_dir(reward_model)
        reward = RewardScorer.options(
            name="LabelRewardScorer", ray_actor_options={"num_cpus": serve_settings.num_cpus_per_replica}
        ).bind(RewardModelSettings(path=str(path)), torch_threads=torch_threads)
    return LabelApp.options(num_replicas=feedback.num_replicas).bind(
        feedback, db_url, admin_key, policy_app, spec, reward, round_, max_items
    )


def deploy_label_app(
    name: str,
    route_prefix: str,
    feedback: FeedbackSettings,
    db_url: str,
    admin_key: str,
    serve_settings: ServeSettings,
    policy: ModelSettings | None = None,
    spec: GenerationSpec | None = None,
    reward_model: str | None = None,
    round_: int = 0,
    max_items: int = 0,
    torch_threads: int = 0,
) -> None:
    """Run (or update) the app as application `name` at `route_prefix`, and ``<name>-policy`` when `policy` is given.

    The policy deployment is the ``PolicyServer`` ``alignray serve`` runs, without an API key or
    HTTP route: only the app's handle reaches it.
    """
    from ray import serve

    policy_app = None
    if policy is not None:
        if spec is None:
            raise ValueError("generating items from a policy needs a GenerationSpec")
        policy_app = f"{name}-policy"
        bound = build_application(policy, spec.model_name, serve_settings, "", None, torch_threads)
        serve.run(bound, name=policy_app, route_prefix=None)
    app = build_label_application(
        feedback, db_url, admin_key, serve_settings, policy_app, spec, reward_model, round_, max_items, torch_threads
    )
    serve.run(app, name=name, route_prefix=route_prefix)


def delete_label_app(name: str) -> None:
    """Take the app (and its policy application, if any) down."""
    from ray import serve

    for app in (name, f"{name}-policy"):
        if app in serve.status().applications:
            serve.delete(app)
