"""Label-store fixtures: a database URL per backend (SQLite file, and PostgreSQL when installed)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from envs.models import ModelSettings
from serve.app import ServeSettings
from serve.labelling.application import deploy_label_app
from serve.labelling.candidates import GenerationSpec
from serve.labelling.schema import metadata
from serve.labelling.settings import FeedbackSettings
from serve.labelling.store import LabelStore
from tests.fixtures.ports import free_port
from tests.fixtures.postgres import postgres_url


@pytest.fixture(scope="session")
def pg_server():
    with postgres_url() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database: a SQLite file, or a wiped PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    url = request.getfixturevalue("pg_server")
    if url is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    engine = create_engine(url)
    metadata.drop_all(engine)
    engine.dispose()
    return url


def make_items(n: int, tag: str = "") -> tuple[list[dict], list[str]]:
    """n candidate pairs and their keys."""
    rows = [
        {"prompt": f"prompt {i}{tag}", "response_a": f"first {i}", "response_b": f"second {i}", "policy": "tiny"}
        for i in range(n)
    ]
    return rows, [f"k{i}{tag}" for i in range(n)]


@pytest.fixture
def store_for(db_url):
    """A function (overlap, claim_timeout_s) -> LabelStore on the test's database; all closed at the end."""
    made = []

    def make(overlap: int = 1, claim_timeout_s: float = 1800.0) -> LabelStore:
        made.append(LabelStore(db_url, overlap=overlap, claim_timeout_s=claim_timeout_s))
        return made[-1]

    yield make
    for s in made:
        s.close()


ADMIN_KEY = "admin-key-for-tests"
PROMPTS = ["the film was", "this movie is", "the acting in it", "the story and the music"]


@pytest.fixture(scope="package")  # this directory is a package so that Ray stops after its last test
def label_servers(tiny_policy_dir, tiny_reward_dir, tmp_path_factory):
    """Ray Serve with two labelling apps on loopback; yields their URLs and stores.

    - ``gen`` at ``/label``: items generated in batches from the tiny policy deployment, reward
      scores from the tiny reward deployment on the admin routes;
    - ``fixed`` at ``/fixed``: items only from what a test puts in its store; small body limit.
    """
    import ray
    from ray import serve

    root = tmp_path_factory.mktemp("label")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    zero = ServeSettings(num_cpus_per_replica=0)
    spec = GenerationSpec(model_name="tiny-policy", prompts=PROMPTS, policy="tiny-policy", max_tokens=8)
    gen_db, fixed_db = f"sqlite:///{root / 'gen.db'}", f"sqlite:///{root / 'fixed.db'}"
    policy = ModelSettings(policy=tiny_policy_dir)
    deploy_label_app(
        "gen", "/label", FeedbackSettings(batch_size=4), gen_db, ADMIN_KEY, zero, policy, spec, tiny_reward_dir
    )
    deploy_label_app("fixed", "/fixed", FeedbackSettings(max_request_bytes=4096), fixed_db, ADMIN_KEY, zero)
    urls = {"gen": f"http://127.0.0.1:{port}/label", "fixed": f"http://127.0.0.1:{port}/fixed", "port": port}
    stores = {"gen": LabelStore(gen_db), "fixed": LabelStore(fixed_db)}
    yield {"urls": urls, "stores": stores, "root": root}
    for s in stores.values():
        s.close()
    serve.shutdown()
    ray.shutdown()
