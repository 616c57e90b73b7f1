"""Real HTTP against a running Ray Serve application on loopback, serving a tiny model.

Two applications share one Serve instance (started once for the module):
- ``secure`` at ``/``: API key on, continuous batching of up to 8 sequences, and a reward
  model with two criteria (positivity, consistency) at ``/v1/rewards``;
- ``open`` at ``/open``: no API key, batching off (``serve.max_batch_size=1``), no reward model.

Continuous vs static batching, the queue bound, cancellation, metrics and logs are in
``test_serve_ops.py``; autoscaling in ``test_autoscaling.py``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve

from cluster.config import load_config
from cluster.serving import start_app
from envs.reward_model import RewardModel
from serve.quantize import resolve_dtype
from tests.serve.helpers import assert_error, free_port, sse_events, start_ray

KEY = "test-key-123"
MODEL = "tiny-policy"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS_LIMIT = 32
MAX_BYTES = 8192


@pytest.fixture(scope="module")
def server(tiny_policy_dir, tiny_criteria_reward_dir):
    """Start Ray and both applications; yield their base URLs; shut everything down."""
    port = free_port()
    common = [
        f"serve.port={port}",
        f"serve.max_tokens_limit={MAX_TOKENS_LIMIT}",
        f"serve.max_request_bytes={MAX_BYTES}",
        "serve.num_cpus_per_replica=0.5",
    ]
    start_ray(num_cpus=4)
    secure = load_config(None, common + [f"serve.api_key={KEY}", "serve.max_batch_size=8"])
    open_ = load_config(None, common + ["serve.max_batch_size=1"])
    urls = {
        "secure": start_app(tiny_policy_dir, secure, tiny_criteria_reward_dir, name="secure", route_prefix="/"),
        "open": start_app(tiny_policy_dir, open_, None, name="open", route_prefix="/open"),
        "port": port,
    }
    yield urls
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["secure"], headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def open_client(server):
    with httpx.Client(base_url=server["open"], timeout=60) as c:
        yield c


def complete(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "the film was", **body})


# ---- routes ----------------------------------------------------------------------------------


def test_healthz_is_open_and_reports_the_model(server):
    body = httpx.get(server["secure"] + "/healthz").json()
    assert body["status"] == "ok" and body["model"] == MODEL and body["rewards"] is True
    assert (
        body["max_batch_size"] == 8
        and body["dtype"] == resolve_dtype("auto")
        and body["batching"]["mode"] == "continuous"
    )
    assert httpx.get(server["open"] + "/healthz").json()["max_batch_size"] == 1


def test_models(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.get("/v1/models/gpt-4"), 404, code="model_not_found")


def test_completion_greedy_usage_and_length(client):
    r = complete(client, max_tokens=6, temperature=0)
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion", r.text
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert body["usage"]["prompt_tokens"] == 3  # word-level tokenizer: "the film was"
    assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert complete(client, max_tokens=6, temperature=0).json()["choices"][0]["text"] == choice["text"]


def test_completion_prompt_list_n_and_seed(client):
    body = complete(client, prompt=["the film", "bad acting"], n=2, max_tokens=4, seed=7).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    again = complete(client, prompt=["the film", "bad acting"], n=2, max_tokens=4, seed=7).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]


def test_stop_string_cuts_the_text(client):
    full = complete(client, max_tokens=12, temperature=0).json()["choices"][0]["text"]
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = complete(client, max_tokens=12, temperature=0, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.find(stop)]


def test_chat_completion_uses_the_chat_template(client):
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "max_tokens": 5,
            "temperature": 0,
            "messages": [{"role": "system", "content": "be good"}, {"role": "user", "content": "the film"}],
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    # tiny template: "<|system|> be good <|user|> the film <|assistant|>" = 7 tokens
    assert body["usage"]["prompt_tokens"] == 7


def test_streaming_completion_matches_non_streaming(client):
    expected = complete(client, max_tokens=8, temperature=0).json()["choices"][0]
    with client.stream(
        "POST",
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "the film was",
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == expected["finish_reason"]
    assert events[-2]["usage"]["completion_tokens"] >= 1


def test_streaming_chat_chunks(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "max_tokens": 6,
            "stream": True,
            "n": 2,
            "messages": [{"role": "user", "content": "the film"}],
        },
    ) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[0]["object"] == "chat.completion.chunk"
    assert [c["delta"]["role"] for c in events[0]["choices"]] == ["assistant", "assistant"]
    finishes = {c["index"]: c["finish_reason"] for e in events[1:-1] for c in e["choices"] if c["finish_reason"]}
    assert set(finishes) == {0, 1}


def test_rewards_match_the_reward_model(client, tiny_criteria_reward_dir):
    texts = ["a wonderful film", "the worst acting", "boring"]
    r = client.post("/v1/rewards", json={"texts": texts})
    assert r.status_code == 200
    expected = RewardModel.load(tiny_criteria_reward_dir).score(texts)  # the first head: positivity
    assert r.json()["scores"] == pytest.approx(expected, abs=1e-4)
    assert r.json()["model"] == "tiny-rm" and r.json()["criterion"] == "positivity"
    assert_error(client.post("/v1/rewards", json={"texts": texts, "prompts": ["one"]}), 400, param="prompts")
    assert_error(client.post("/v1/rewards", json={"texts": []}), 400, param="texts")


def test_rewards_per_criterion(client, server, tiny_criteria_reward_dir):
    rm = RewardModel.load(tiny_criteria_reward_dir)
    texts, prompts = ["a wonderful film", "the worst acting"], ["I hated this movie", "I hated this movie"]
    assert httpx.get(server["secure"] + "/healthz").json()["reward_criteria"] == ["positivity", "consistency"]
    assert httpx.get(server["open"] + "/healthz").json()["reward_criteria"] == []
    for criterion in ("positivity", "consistency"):
        for normalize in (False, True):
            body = {"texts": texts, "prompts": prompts, "criterion": criterion, "normalize": normalize}
            r = client.post("/v1/rewards", json=body)
            assert r.status_code == 200, r.text
            want = rm.score(texts, prompts, normalize=normalize, criterion=criterion)
            assert r.json()["criterion"] == criterion and r.json()["scores"] == pytest.approx(want, abs=1e-4)
    # The heads differ (they are different functions of the text), so the criterion really chose one.
    assert rm.score(texts, prompts, criterion="consistency") != pytest.approx(rm.score(texts, prompts), abs=1e-3)
    unknown = client.post("/v1/rewards", json={"texts": texts, "criterion": "safety"})
    assert "positivity" in assert_error(unknown, 400, param="criterion", code="criterion_not_found")["message"]
    no_prompts = client.post("/v1/rewards", json={"texts": texts, "criterion": "consistency"})
    assert "against its prompt" in assert_error(no_prompts, 400, param="prompts")["message"]
    assert_error(client.post("/v1/rewards", json={"texts": texts, "criterion": ""}), 400, param="criterion")


def test_rewards_not_served_without_a_reward_model(open_client):
    assert_error(open_client.post("/v1/rewards", json={"texts": ["x"]}), 404, code="rewards_not_served")


# ---- batching --------------------------------------------------------------------------------


def _concurrent(client: httpx.Client, n: int, max_tokens: int = 4) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: complete(client, max_tokens=max_tokens, seed=i, ignore_eos=True), range(n)))


def test_concurrent_requests_share_the_running_batch(client):
    responses = _concurrent(client, 4, max_tokens=32)
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["x-alignray-batch-size"]) for r in responses) >= 2
    stats = client.get("/healthz").json()["batching"]
    assert stats["max_rows"] >= 2 and stats["running"] == 0 and stats["waiting"] == 0


def test_batching_off_runs_requests_alone(open_client):
    responses = _concurrent(open_client, 2)
    assert [r.headers["x-alignray-batch-size"] for r in responses] == ["1", "1"]
    assert open_client.get("/healthz").json()["batching"]["max_rows"] == 1
    # n > 1 needs a batch of n sequences: refused clearly when batching is off.
    assert_error(complete(open_client, n=2), 400, param="n")


# ---- bad input -------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["film"] * 300)  # 300 tokens > the tiny model's 256-token context

BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"stream": "yes"}, "stream"),
    ({"n": 1.5}, "n"),
    ({"seed": "7"}, "seed"),
]


@pytest.mark.parametrize("extra,param", BAD_COMPLETIONS, ids=[p + str(i) for i, (_, p) in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_parameters_are_400(client, extra, param):
    assert_error(complete(client, **extra), 400, param=param)


def test_prompt_longer_than_the_context_is_400(client):
    assert_error(complete(client, prompt=LONG_PROMPT), 400, param="prompt", code="context_length_exceeded")
    near = " ".join(["film"] * 250)  # fits, but not with 32 new tokens
    assert_error(
        complete(client, prompt=near, max_tokens=MAX_TOKENS_LIMIT),
        400,
        param="max_tokens",
        code="context_length_exceeded",
    )
    assert_error(
        client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]}
        ),
        400,
        param="messages",
    )


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, "messages.0.mood"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 999}, "max_tokens"),
    ],
)
def test_bad_chat_requests_are_400(client, body, param):
    assert_error(client.post("/v1/chat/completions", json={"model": MODEL, **body}), 400, param=param)


def test_malformed_and_wrong_bodies_are_400(client):
    json_header = {"content-type": "application/json"}
    assert (
        "parse the JSON"
        in assert_error(client.post("/v1/completions", content=b'{"model": ', headers=json_header), 400)["message"]
    )
    assert_error(client.post("/v1/completions", content=b"[1, 2]", headers=json_header), 400)
    assert_error(client.post("/v1/completions", content=b"", headers=json_header), 400)
    assert_error(client.post("/v1/completions", json={"prompt": "x"}), 400, param="model")


def test_unknown_model_route_and_method(client):
    assert_error(complete(client, model="gpt-4"), 404, param="model", code="model_not_found")
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_request_size_is_bounded(client):
    big = "film " * (MAX_BYTES // 4)
    assert_error(complete(client, prompt=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the server must count
        yield b'{"model": "tiny-policy", "prompt": "'
        for _ in range(MAX_BYTES // 1000 + 2):
            yield b"film " * 200
        yield b'"}'

    assert_error(
        client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
        413,
        code="request_too_large",
    )


# ---- auth ------------------------------------------------------------------------------------


def test_auth_on(server):
    url = server["secure"] + "/v1/completions"
    body = {"model": MODEL, "prompt": "the film", "max_tokens": 2}
    assert_error(httpx.post(url, json=body), 401, code="invalid_api_key")
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(url, json=body, headers={"Authorization": KEY}), 401)
    assert_error(httpx.get(server["secure"] + "/v1/models"), 401)
    assert_error(httpx.post(url, content=b"{bad"), 401)  # auth is checked before the body is parsed
    assert httpx.post(url, json=body, headers=AUTH).status_code == 200


def test_auth_off(open_client):
    assert complete(open_client, max_tokens=2).status_code == 200
    assert open_client.get("/v1/models").status_code == 200


# ---- the official client ---------------------------------------------------------------------


def test_openai_client_round_trip(server):
    oai = openai.OpenAI(base_url=server["secure"] + "/v1", api_key=KEY, max_retries=0)
    c = oai.completions.create(model=MODEL, prompt="the film was", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.prompt_tokens == 3
    chat = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "the film"}], max_tokens=5, seed=1
    )
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    streamed = "".join(
        ch.choices[0].text
        for ch in oai.completions.create(model=MODEL, prompt="the film was", max_tokens=5, temperature=0, stream=True)
        if ch.choices
    )
    assert streamed == c.choices[0].text
    parts = [
        ch.choices[0].delta.content or ""
        for ch in oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "the film"}], max_tokens=5, seed=1, stream=True
        )
        if ch.choices
    ]
    assert "".join(parts) == chat.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["secure"] + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.completions.create(model=MODEL, prompt="the film", max_tokens=MAX_TOKENS_LIMIT + 1)
    free = openai.OpenAI(base_url=server["open"] + "/v1", api_key="anything", max_retries=0)
    assert free.models.list().data[0].id == MODEL


# ---- shutdown (keep last) --------------------------------------------------------------------


def test_zz_application_stops_cleanly(server):
    assert serve.status().applications["secure"].status == "RUNNING"
    serve.shutdown()
    ray.shutdown()
    assert not ray.is_initialized()
    with pytest.raises(httpx.TransportError):
        httpx.get(server["secure"] + "/healthz", timeout=5)
