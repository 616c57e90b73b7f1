"""The simulated annotator, labelling through the app's HTTP API as a person's browser would.

It is the Bradley-Terry VADER annotator of ``data/make_preferences.py``: with gold scores s
(VADER compound) it prefers the left response with P = sigmoid((s_left - s_right) / tau), drawn
independently for the overall verdict and each criterion (it only knows sentiment).
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

from envs.gold import gold_score
from serve.labelling.client import LabelClient


def bradley_terry_choice(s_left: float, s_right: float, tau: float, rng: random.Random) -> str:
    """'left' with probability sigmoid((s_left - s_right) / tau), else 'right'."""
    p_left = 1.0 / (1.0 + math.exp(-(s_left - s_right) / tau))
    return "left" if rng.random() < p_left else "right"


@dataclass
class SimulatedAnnotator:
    """Labels items from ``client`` until none is left (or ``stop`` is set); records what was acknowledged."""

    client: LabelClient
    criteria: list[str]
    tau: float = 0.1
    seed: int = 0
    acknowledged: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    """Seconds from sending a label to its acknowledgement."""

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def judge(self, left: str, right: str) -> dict[str, str]:
        """Choices as shown, for 'overall' and every criterion."""
        s_left, s_right = gold_score(left), gold_score(right)
        return {c: bradley_terry_choice(s_left, s_right, self.tau, self.rng) for c in ["overall", *self.criteria]}

    def run(self, stop: threading.Event | None = None, wait_s: float = 0.0, limit: int = 0) -> int:
        """Label until nothing is left (after waiting up to `wait_s` for more), `stop`, or `limit` labels."""
        idle_since = None
        while not (stop is not None and stop.is_set()) and not (limit and len(self.acknowledged) >= limit):
            item = self.client.next()["item"]
            if item is None:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= wait_s:
                    break
                time.sleep(0.2)
                continue
            idle_since = None
            choices = self.judge(item["left"], item["right"])
            start = time.monotonic()
            saved = self.client.label(item["slot"], choices, request_id=uuid.uuid4().hex)
            self.latencies.append(time.monotonic() - start)
            self.acknowledged.append(saved["label"])
        return len(self.acknowledged)
