"""Constitutions: load and validate `constitutions/*.yaml`, and sample principles deterministically.

A constitution (Bai et al. 2022, arXiv 2212.08073) is a list of principles, each with a critique
request, a revision request and a comparison instruction for the AI-feedback stage, plus few-shot
examples that show the model what a critique and a revision look like.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from factory.config import ConfigError, Strict, format_validation_error, read_yaml


def _non_empty(v: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a non-empty string")
    return v.strip()


class Principle(Strict):
    id: str = Field(..., description="Unique id within the constitution, e.g. 'avoid-harm'.")
    critique_request: str = Field(..., description="Asks the model to critique the assistant's last response.")
    revision_request: str = Field(..., description="Asks the model to rewrite the response to address the critique.")
    comparison: str = Field(..., description="Question for the judge comparing two responses (AI-feedback stage).")

    _strip = field_validator("id", "critique_request", "revision_request", "comparison")(_non_empty)


class Example(Strict):
    principle: str = Field(..., description="Id of the principle this example critiques against.")
    prompt: str = Field(..., description="The human's request.")
    response: str = Field(..., description="The assistant's initial, flawed response.")
    critique: str = Field(..., description="A model critique of the response.")
    revision: str = Field(..., description="The revised response.")

    _strip = field_validator("principle", "prompt", "response", "critique", "revision")(_non_empty)


class Constitution(Strict):
    id: str = Field(..., description="Constitution id, e.g. 'harmless'.")
    version: str = Field(..., description="Version string; bump it when principles change.")
    description: str = Field("", description="What the constitution is for.")
    principles: list[Principle] = Field(..., min_length=1, description="The principles.")
    examples: list[Example] = Field(default_factory=list, description="Few-shot critique/revision examples.")

    _strip = field_validator("id", "version")(_non_empty)

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v):
        return str(v) if isinstance(v, (int, float)) else v

    @model_validator(mode="after")
    def _check_ids(self):
        seen: set[str] = set()
        for p in self.principles:
            if p.id in seen:
                raise ValueError(f"principle id {p.id!r} is used twice; ids must be unique")
            seen.add(p.id)
        for i, ex in enumerate(self.examples):
            if ex.principle not in seen:
                raise ValueError(f"examples[{i}].principle {ex.principle!r} is not a principle id in this file")
        return self

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(principle_id)


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution YAML; errors name the file and the principle."""
    data = read_yaml(path)
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        msg = format_validation_error(e, str(path), Constitution)
        # Name the principle by id, not only by list index, when we can.
        for p_i, p in enumerate(data.get("principles") or []):
            if isinstance(p, dict) and p.get("id"):
                msg = msg.replace(f"principles.{p_i}.", f"principles.{p_i} (id {p['id']!r}).")
        raise ConfigError(msg.replace("invalid config", "invalid constitution")) from e


def sample_principles(constitution: Constitution, k: int, seed: int, key: str) -> list[Principle]:
    """k distinct principles, a pure function of (seed, key) so a resumed run samples the same ones."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    k = min(k, len(constitution.principles))
    return rng.sample(constitution.principles, k)
