"""Generate data/preferences.parquet: response pairs from the embedded policy, labelled by a simulated annotator.

For each pair a prompt is drawn from data/prompts.parquet (train pairs from train prompts, test
pairs from held-out prompts), formatted exactly as the environment formats it, and SmolLM2
samples two responses (temperature 1, the env's max_new_tokens). The gold score of a response is
VADER's compound sentiment; the annotator prefers response a over b with the Bradley-Terry
probability P(a > b) = sigmoid((s_a - s_b) / tau). Gold scores are kept for evaluation.
Deterministic for a given seed on one machine.

Train split: a prompt drawn k times has 2k sampled responses, and the annotator compares every
two of them (``--pairing all``, as InstructGPT ranks K responses per prompt into C(K, 2)
comparisons), so each response is judged several times instead of once; the reward-model trainer
encodes each response once per batch however many pairs it is in. The held-out split keeps one
pair per draw, so its agreement numbers stay comparable across pairings.

    python data/make_preferences.py [--train 4000] [--test 500] [--tau 0.1] [--seed 0] [--pairing all]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from cluster.config import load_config
from envs.data import load_prompts, write_preferences
from envs.gold import gold_scores
from envs.models import load_causal_lm
from envs.prompting import left_pad, prompt_ids

DATA = Path(__file__).parent


@torch.no_grad()
def sample_pairs(model, tok, prompts: list[str], cfg, batch: int, bar: tqdm, cache: Path) -> list[tuple[str, str]]:
    """Two sampled responses for each prompt, generated in left-padded batches.

    Each batch is saved to `cache` as it finishes, and a rerun picks up where the last one
    stopped (the sampling seed is derived from the batch index, so the result is the same).
    """
    out: list[tuple[str, str]] = []
    done = json.loads(cache.read_text()) if cache.exists() else []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        if i // batch < len(done):
            out += [tuple(p) for p in done[i // batch]]
            bar.update(len(chunk))
            continue
        torch.manual_seed(hash_seed(cache.name, i))
        ids = [prompt_ids(tok, p, cfg.env.instruction, cfg.env.chat_template, cfg.env.max_prompt_tokens) for p in chunk]
        input_ids, mask = left_pad(ids, tok.pad_token_id)
        width = input_ids.shape[1]
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cfg.env.max_new_tokens,
            num_return_sequences=2,
            pad_token_id=tok.pad_token_id,
        )
        texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
        pairs = [(texts[2 * j].strip(), texts[2 * j + 1].strip()) for j in range(len(chunk))]
        out += pairs
        done.append(pairs)
        cache.write_text(json.dumps(done))
        bar.update(len(chunk))
    return out


def hash_seed(name: str, index: int) -> int:
    """A stable per-batch seed (Python's hash() is salted per process)."""
    return zlib.crc32(f"{name}:{index}".encode())


def all_pairs(prompts: list[str], pairs: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Every two distinct responses sampled for the same prompt, in first-seen order."""
    by_prompt: dict[str, list[str]] = {}
    for prompt, pair in zip(prompts, pairs):
        seen = by_prompt.setdefault(prompt, [])
        seen += [r for r in pair if r and r not in seen]
    out_prompts, out_pairs = [], []
    for prompt, responses in by_prompt.items():
        for i, a in enumerate(responses):
            for b in responses[i + 1 :]:
                out_prompts.append(prompt)
                out_pairs.append((a, b))
    return out_prompts, out_pairs


def label(prompts: list[str], pairs: list[tuple[str, str]], split: str, tau: float, rng: random.Random) -> list[dict]:
    """Bradley-Terry annotator: keep pairs with two non-empty responses, prefer by noisy gold score."""
    rows = []
    texts = sorted({r for pair in pairs for r in pair if r})
    gold = dict(zip(texts, gold_scores(texts)))  # each distinct response scored once
    for prompt, (a, b) in zip(prompts, pairs):
        if not a or not b:
            continue
        sa, sb = gold[a], gold[b]
        p_a = 1.0 / (1.0 + math.exp(-(sa - sb) / tau))
        chosen, rejected, sc, sr = (a, b, sa, sb) if rng.random() < p_a else (b, a, sb, sa)
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "split": split,
                "chosen_score": sc,
                "rejected_score": sr,
            }
        )
    return rows


def main() -> None:
    """Sample, label and write the preference file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--pairing",
        choices=["all", "sampled"],
        default="all",
        help="train pairs: every two responses of a prompt (all) or one pair per draw (sampled)",
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=str(DATA / "preferences.parquet"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = DATA / ".cache"
    cache_dir.mkdir(exist_ok=True)
    cfg = load_config("demo")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    model, tok = load_causal_lm(args.model)
    rows: list[dict] = []
    start = time.time()
    # Over-sample by 10% so pairs dropped for an empty response still leave the requested count.
    for split, n in (("train", args.train), ("test", args.test)):
        pool = load_prompts(DATA / "prompts.parquet", split)
        prompts = [rng.choice(pool) for _ in range(int(n * 1.1) + 8)]
        with tqdm(total=len(prompts), desc=f"sampling {split} pairs", unit="pair") as bar:
            cache = cache_dir / f"{split}-{n}-seed{args.seed}-{args.model.replace('/', '_')}.json"
            pairs = sample_pairs(model, tok, prompts, cfg, args.batch, bar, cache)
        labelled = label(prompts, pairs, split, args.tau, rng)[:n]  # the first n draws fix the responses
        if split == "train" and args.pairing == "all":
            kept = {(r["prompt"], r["chosen"]) for r in labelled} | {(r["prompt"], r["rejected"]) for r in labelled}
            drawn = [(p, pair) for p, pair in zip(prompts, pairs) if (p, pair[0]) in kept and (p, pair[1]) in kept]
            # Its own random stream, so the held-out draws below stay the same for either pairing.
            labelled = label(
                *all_pairs([p for p, _ in drawn], [pair for _, pair in drawn]),
                split,
                args.tau,
                random.Random(f"all-pairs-{args.seed}"),
            )
        rows += labelled
    write_preferences(args.out, rows)
    print(f"{args.out}: {len(rows)} pairs in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
