"""The ``serve`` section: typed settings of the policy deployment (HTTP, limits, batching, replicas, access, logs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from envs.settings import Settings


class ServeSettings(Settings):
    """The ``serve`` section: the HTTP endpoint, its limits, batching, dtype, replicas, access and logging."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; loopback unless you mean to expose it."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port."""
    api_key: str = ""
    """Bearer token required on every request when set (or env ALIGNRAY_API_KEY)."""
    api_keys_file: str = ""
    """File of accepted bearer tokens, one per line ('#' comments); re-read when it changes, so keys rotate
    without a restart (replace it atomically: write a new file, then rename it over the old one)."""
    max_tokens_limit: int = Field(256, ge=1)
    """Largest max_tokens a request may ask for."""
    max_request_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted."""
    batching: Literal["continuous", "static"] = "continuous"
    """continuous: waiting requests join the running batch at every decoding step and finished ones leave it;
    static: a batch is formed when the replica is idle and runs until its last sequence ends (for comparison)."""
    max_batch_size: int = Field(16, ge=1)
    """Sequences (prompts x n) decoded together on one replica (1 = batching off)."""
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    """static batching: how long an idle replica waits for a batch to fill (continuous admits at once)."""
    max_queue: int = Field(32, ge=1)
    """Sequences waiting for a batch slot on one replica; more get 429 with Retry-After (>= max_batch_size)."""
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = "auto"
    """How the policy's Linear layers multiply: float32; bfloat16 (bfloat16 weights and products, the rest of the
    model float32; fast only on CPUs with AVX-512 BF16 or AMX; with AVX2 alone the whole model is cast, 0.20x
    float32's speed); int8 = dynamic quantisation of every Linear layer
    (int8 weights, activations quantised per call). auto = bfloat16 where the CPU multiplies it natively, else
    float32: on SmolLM2 bfloat16 cost 0.0008 nats/token of KL to float32 for 1.43x the tokens/s
    (bench/serve_quant_bench.py); int8 cost 2.3 nats/token, so it is never chosen for you."""
    pack_weights: bool = True
    """float32 and bfloat16 on a CPU: serve with the Linear weights pre-packed for oneDNN (float32: same maths to float
    rounding, about 1.5x faster decoding steps at 4-16 sequences; off = plain nn.Linear, and bfloat16 then casts the
    whole model)."""
    gil_switch_interval_ms: float = Field(0.5, gt=0)
    """Python's GIL switch interval in a replica (its default is 5 ms): after each torch op the generation thread
    waits at most this long for the GIL while the event loop streams responses. Two A/B runs of
    bench/serve_gil_bench.py: 0.5 ms made decoding steps 0-11% shorter; requests/s moved 0.87-1.12x, within
    the 2-core machine's run-to-run noise."""
    min_replicas: int = Field(1, ge=0)
    """Autoscaling lower bound."""
    max_replicas: int = Field(1, ge=1)
    """Autoscaling upper bound."""
    target_ongoing_requests: int = Field(16, ge=1)
    """Autoscaling target of in-flight requests per replica."""
    upscale_delay_s: float = Field(30.0, ge=0)
    """Autoscaling: how long the load must call for more replicas before one is added."""
    downscale_delay_s: float = Field(600.0, ge=0)
    """Autoscaling: how long the load must allow fewer replicas before one is removed."""
    autoscaling_metrics_interval_s: float = Field(10.0, gt=0)
    """Autoscaling: how often replicas and handles report their ongoing requests to the controller."""
    look_back_period_s: float = Field(30.0, gt=0)
    """Autoscaling: the window the ongoing-request count is averaged over (> autoscaling_metrics_interval_s)."""
    num_cpus_per_replica: float = Field(1.0, ge=0)
    """CPUs per model replica."""
    num_gpus_per_replica: float = Field(0.0, ge=0)
    """GPUs per model replica."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica accepts at once (queued ones included); above max_batch_size + max_queue the extra ones
    get 429 from the replica instead of waiting in Serve's router."""
    model_name: str = ""
    """Model id clients pass as `model` (empty = the directory name, or 'smollm2')."""
    log_requests: bool = False
    """Write prompts and responses to the replica's log (off: only ids, statuses, token counts and timings)."""
    log_mask: bool = True
    """With log_requests: replace e-mail addresses and digit runs in the logged text by placeholders."""
    reward_sample_rate: float = Field(1.0, ge=0, le=1)
    """Share of served responses the attached reward model scores for the reward-score metric (drift)."""

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        if self.max_queue < self.max_batch_size:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be >= max_batch_size ({self.max_batch_size}), "
                "or a request that fits a batch may never fit the queue"
            )
        if self.look_back_period_s <= self.autoscaling_metrics_interval_s:
            raise ValueError(
                f"look_back_period_s ({self.look_back_period_s}) must be > autoscaling_metrics_interval_s "
                f"({self.autoscaling_metrics_interval_s})"
            )
        return self
