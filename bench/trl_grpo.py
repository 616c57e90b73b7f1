"""TRL 1.16 ``GRPOTrainer`` on alignray's task: the TRL side of ``bench/side_by_side.py``.

Everything but the trainer is alignray's, taken from the same preset and overrides that
``alignray train`` reads:

- policy and reference: ``model.policy`` (SmolLM2-135M-Instruct from the embedded wheel, or the
  tiny random model exported to a temporary HF directory), float32 on the CPU;
- prompts: the train split of ``data.prompts``, each one the exact token ids the env feeds the
  policy (``env.instruction`` + prompt in the chat template, left-truncated to
  ``env.max_prompt_tokens``), handed to TRL as the decoded text; every prompt is checked to
  tokenize back to the same ids the way TRL tokenizes it;
- reward: the env's own :class:`envs.rewards.RewardFunction` (the trained reward model at
  ``reward_model.path``, normalised iff ``env.reward_normalization``, the empty-response score,
  any other weighted parts) called on the decoded completion and the raw prompt, as the env does;
- budget: ``ppo.iterations`` x ``ppo.episodes_per_iteration`` responses in groups of
  ``--group-size`` (``num_generations``), ``env.max_new_tokens`` tokens at most, SGD minibatches
  of ``ppo.minibatch_episodes`` responses, ``ppo.epochs`` passes (``num_iterations``);
- optimisation: Adam at a constant ``ppo.lr`` (no schedule, no weight decay), gradient-norm clip
  ``ppo.grad_clip``, ratio clip ``ppo.clip_param``, KL coefficient ``beta = ppo.kl_coef`` (TRL's k3
  in the loss), temperature ``ppo.temperature`` with no top-k/top-p, ``run.torch_threads``
  torch threads, seed ``run.seed``.

TRL's own defaults that would make the comparison unequal are switched off: gradient
checkpointing (on by default in TRL: about 20% slower, alignray does not checkpoint), bf16 mixed
precision (on by default; alignray trains in float32) and the linear learning-rate decay.

    .venv-bench/bin/python bench/trl_grpo.py demo ppo.lr=2.5e-5 ppo.kl_coef=0.05 --group-size 8 --out runs/bench/trl_grpo
    .venv-bench/bin/python bench/trl_grpo.py tiny --group-size 4 --out /tmp/trl_tiny   # seconds

Writes ``<out>/policy/`` (a Hugging Face directory: ``alignray eval <out>/policy demo`` evaluates
it like any alignray policy) and ``<out>/trl_metrics.json`` (responses, training seconds,
responses/s, the time spent generating and scoring, TRL's per-step logs). Needs the bench
environment (``bash bench/trl_env.sh``): TRL is not an alignray dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing comes from a hub: every model is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from cluster.config import Config, load_config, preset_and_overrides  # noqa: E402
from envs import tiny  # noqa: E402
from envs.models import export_pretrained, resolve_model_dir  # noqa: E402
from envs.rewards import Finished  # noqa: E402
from envs.text_env import EnvResources, build_resources  # noqa: E402


def steps_per_generation(cfg: Config, group_size: int) -> int:
    """Optimizer steps per generation batch (one alignray iteration), checking that the budget divides evenly."""
    p = cfg.ppo
    if p.episodes_per_iteration % group_size or p.minibatch_episodes % group_size:
        raise SystemExit(
            f"trl_grpo: responses per iteration ({p.episodes_per_iteration}) and per minibatch "
            f"({p.minibatch_episodes}) must be multiples of the group size ({group_size})"
        )
    if p.episodes_per_iteration % p.minibatch_episodes:
        raise SystemExit(
            f"trl_grpo: responses per iteration ({p.episodes_per_iteration}) must be a multiple of the "
            f"minibatch ({p.minibatch_episodes})"
        )
    return p.episodes_per_iteration // p.minibatch_episodes


def grpo_config(cfg: Config, group_size: int, out: Path) -> GRPOConfig:
    """TRL's config for the same budget and optimisation as the alignray run of `cfg`."""
    p, steps = cfg.ppo, steps_per_generation(cfg, group_size)
    return GRPOConfig(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 mixed precision; alignray trains float32 master weights
        fp16=False,
        activation_checkpointing=False,  # TRL turns it on by default (recomputes activations); alignray does not
        model_init_kwargs={"dtype": "float32"},  # policy and reference, as alignray's model.dtype
        per_device_train_batch_size=p.minibatch_episodes,
        gradient_accumulation_steps=1,
        steps_per_generation=steps,  # generation batch = one iteration's responses
        num_generations=group_size,
        num_iterations=p.epochs,
        max_steps=p.iterations * steps * p.epochs,
        max_completion_length=cfg.env.max_new_tokens,
        temperature=p.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=p.lr,
        lr_scheduler_type="constant",  # TrainingArguments decays linearly to 0 by default
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=p.grad_clip,
        epsilon=p.clip_param,
        beta=p.kl_coef,
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,  # the per-step log lines are the progress; a bar only garbles the bench log
    )


def model_dir(cfg: Config, tmp: Path) -> str:
    """The policy as a Hugging Face directory TRL can load (the policy and, from the same path, its reference)."""
    if cfg.model.policy == "tiny":  # the same seeded random model that alignray's 'tiny' spec builds
        return str(export_pretrained(*tiny.causal_lm(cfg.model.tiny_vocab_size), tmp / "tiny_policy"))
    return resolve_model_dir(cfg.model.policy)


def prompt_dataset(res: EnvResources) -> Dataset:
    """Train prompts as the text whose tokens are exactly the env's prompt ids, plus the raw prompt for the reward."""
    tok = res.tokenizer
    texts, bad = [], []
    for i, prompt in enumerate(res.prompts):
        ids = res.prompt_ids(prompt, i)
        text = tok.decode(ids, skip_special_tokens=False)
        if tok(text=text)["input_ids"] != ids:  # how GRPOTrainer tokenizes a plain-text prompt
            bad.append(i)
        texts.append(text)
    if bad:
        raise SystemExit(f"trl_grpo: {len(bad)} prompts (first: #{bad[0]}) do not tokenize back to the env's ids")
    return Dataset.from_dict({"prompt": texts, "raw_prompt": list(res.prompts)})


class AlignrayReward:
    """The env's reward as a TRL reward function: ``(completion_ids, raw_prompt) -> rewards``; counts responses."""

    __name__ = "alignray_reward"  # TRL names a reward function's log columns after it

    def __init__(self, res: EnvResources):
        self.res = res
        self.responses = 0
        self.tokens = 0

    def __call__(self, prompts, completions, completion_ids, raw_prompt, log_metric=None, **_) -> list[float]:
        """Score each completion as the env scores a finished episode (text decoded without special tokens)."""
        tok, eos = self.res.tokenizer, self.res.tokenizer.eos_token_id
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        reached = [bool(ids) and ids[-1] == eos for ids in completion_ids]
        lengths = [len(ids) for ids in completion_ids]
        batch = Finished(texts, list(raw_prompt), lengths, reached, self.res.settings.max_new_tokens)
        totals, parts = self.res.reward_fn(batch)
        self.responses += len(texts)
        self.tokens += sum(lengths)
        if log_metric is not None:  # the gold score during training, as alignray's metrics.csv has it
            log_metric("gold_score", sum(p["gold"] for p in parts) / len(parts))
        return totals


class Clock(TrainerCallback):
    """Wall time from the start of training to its end, and of the generate-and-score stage within it."""

    def __init__(self):
        self.start = self.end = 0.0
        self.generation = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    def time_generation(self, trainer: GRPOTrainer) -> None:
        """Wrap the trainer's generate-and-score step (sampling, reward, old and reference log-probs)."""
        inner = trainer._generate_and_score_completions

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.generation += time.perf_counter() - t0

        trainer._generate_and_score_completions = timed


def train(cfg: Config, group_size: int, out: Path) -> dict:
    """Train with TRL's GRPOTrainer, export the policy to ``<out>/policy``, write and return the measurements."""
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)  # an untrained (tiny) reward model draws its head from the global stream
    res = build_resources(
        cfg.env, model=cfg.model, data=cfg.data, reward_model=cfg.reward_model, split="train", seed=cfg.run.seed
    )
    reward, clock = AlignrayReward(res), Clock()
    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as tmp:
        args = grpo_config(cfg, group_size, out)
        trainer = GRPOTrainer(
            model=model_dir(cfg, Path(tmp)),
            reward_funcs=reward,
            args=args,
            train_dataset=prompt_dataset(res),
            processing_class=res.tokenizer,
            callbacks=[clock],
        )
        clock.time_generation(trainer)
        print(
            f"trl_grpo: {cfg.model.policy}, {args.max_steps} optimizer steps, {args.generation_batch_size} responses "
            f"per generation ({group_size} per prompt), <= {args.max_completion_length} tokens, lr {args.learning_rate}, "
            f"beta {args.beta}, {torch.get_num_threads()} torch threads, eos ids {trainer.eos_token_ids}",
            flush=True,
        )
        trainer.train()
        export_pretrained(trainer.model, res.tokenizer, out / "policy")
    seconds = clock.end - clock.start
    metrics = {
        "trainer": "trl.GRPOTrainer",
        "policy_dir": str(out / "policy"),
        "responses": reward.responses,
        "response_tokens": reward.tokens,
        "train_seconds": seconds,
        "generation_seconds": clock.generation,
        "update_seconds": seconds - clock.generation,
        "responses_per_s": reward.responses / seconds,
        "seconds_per_1000_responses": 1000 * seconds / reward.responses,
        "grpo_config": {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))},
        "log_history": trainer.state.log_history,
    }
    (out / "trl_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"trl_grpo: {reward.responses} responses in {seconds:.1f}s ({metrics['responses_per_s']:.2f} responses/s, "
        f"{metrics['seconds_per_1000_responses']:.0f}s per 1,000; generating and scoring {clock.generation:.1f}s); "
        f"policy in {out / 'policy'}",
        flush=True,
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Command line: ``trl_grpo.py [preset] [section.field=value ...] --group-size K --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None, help="alignray preset or YAML file (default: demo)")
    parser.add_argument("overrides", nargs="*", help="alignray section.field=value overrides")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt (TRL's num_generations)")
    parser.add_argument("--out", required=True, help="output directory (policy/, trl_metrics.json)")
    a = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-load weight bars in the benchmark log
    train(load_config(*preset_and_overrides(a.config, a.overrides)), a.group_size, Path(a.out))


if __name__ == "__main__":
    main()
