"""Generate data/prompts.parquet: openings of movie reviews for the policy to continue.

Openings are composed from templates, invented titles, genres and sentiment-bearing phrases
(positive, negative and neutral in about equal shares), so the task starts from every mood.
Deterministic: the same seed writes the same file.

    python data/make_prompts.py [--n 1500] [--test 250] [--seed 0] [--out data/prompts.parquet]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from envs.data import write_prompts

TITLE_A = (
    "Midnight Silent Broken Golden Last Hidden Crimson Lost Frozen Electric Paper Wild Quiet Burning Distant".split()
)
TITLE_B = (
    "Harbor Garden Signal Kingdom Mirror River Empire Letters Horizon Machine Winter Orchard Echo Voyage Circus".split()
)
GENRES = [
    "thriller",
    "comedy",
    "drama",
    "horror film",
    "romance",
    "documentary",
    "sci-fi epic",
    "animated feature",
    "western",
    "musical",
    "crime story",
    "war film",
]
WHEN = [
    "last night",
    "on Sunday",
    "with my kids",
    "on a long flight",
    "at a festival screening",
    "after hearing the hype",
    "on a rainy afternoon",
    "for the second time",
    "in an empty theater",
]
POSITIVE = [
    "I was pleasantly surprised",
    "the cast is superb",
    "it moved me more than I expected",
    "the script is sharp and funny",
    "the photography is gorgeous",
    "I loved almost every minute",
    "the lead gives a career-best performance",
    "it is a real crowd-pleaser",
]
NEGATIVE = [
    "I was bored within twenty minutes",
    "the dialogue is painfully clumsy",
    "it wastes a talented cast",
    "the plot makes no sense",
    "the pacing is dreadful",
    "I regret buying the ticket",
    "the ending ruins what came before",
    "the jokes fall flat",
]
NEUTRAL = [
    "I did not know what to expect",
    "it runs just over two hours",
    "it is based on a novel",
    "the director's last film divided critics",
    "it was shot in three countries",
    "the trailer gives little away",
    "it opens with a long silent scene",
    "it is the third in a series",
]
TEMPLATES = [
    "I watched {title} {when}, and {phrase}. The",
    "{title} is a {genre}, and {phrase}. Honestly,",
    "Going into {title}, {phrase}. By the end,",
    "{title}: {phrase}. The story",
    "This {genre} from a first-time director, {title}, left me thinking that {phrase}. The",
    "Review of {title}. I saw it {when} and {phrase}. What",
    "My take on {title}, a {genre}: {phrase}, and",
    "Saw {title} {when}. Short version: {phrase}. Longer version:",
]


def make_prompts(n: int, seed: int) -> list[str]:
    """`n` distinct review openings, cycling through positive, negative and neutral phrases."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    moods = [POSITIVE, NEGATIVE, NEUTRAL]
    while len(out) < n:
        phrase = rng.choice(moods[len(out) % 3])
        text = rng.choice(TEMPLATES).format(
            title=f"{rng.choice(TITLE_A)} {rng.choice(TITLE_B)}",
            genre=rng.choice(GENRES),
            when=rng.choice(WHEN),
            phrase=phrase,
        )
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def main() -> None:
    """Write the prompt file with a held-out test split."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--test", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "prompts.parquet"))
    args = ap.parse_args()
    prompts = make_prompts(args.n, args.seed)
    splits = ["test" if i < args.test else "train" for i in range(args.n)]
    print(write_prompts(args.out, prompts, splits), f"{args.n - args.test} train, {args.test} test prompts")


if __name__ == "__main__":
    main()
