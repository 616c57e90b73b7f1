"""The base of every component's settings: a pydantic model with one docstring per field.

Each component owns a small :class:`Settings` subclass defined next to it (``EnvSettings`` beside
the env, ``PPOSettings`` beside the learner, ...). A field's docstring is its documentation
(``alignray config show --docs`` prints it) and its constraints (``Field(gt=0)``) sit on the
field, so a bad value fails where it is declared, naming the field. ``cluster.config`` composes
the sections into the application config; nothing else sees the whole config.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """Typed, validated settings: unknown keys, NaN/inf and out-of-range values are errors."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        validate_assignment=True,
        validate_default=True,
    )


def describe(cls: type[Settings], prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted field, default, docstring) of every leaf field, sections first-to-last."""
    for name, info in cls.model_fields.items():
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, Settings):
            yield from describe(tp, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info.get_default(call_default_factory=True), info.description or ""
