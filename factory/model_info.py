"""What factory must know about a model before any engine starts: its identity and its tokenizer.

`load_model_info` reads only the model folder's small files (config, tokenizer, chat template, the headers and
a few sampled blocks of the weight files), so a pipeline checks every model it will use in seconds, before the
store is touched or an engine is started:
- prompt_format 'chat' needs a chat template;
- the log-prob judge needs answer tokens this tokenizer can score (see `answer_cue`);
- untrusted text is quoted against this tokenizer's own control strings (`special_tokens`), not a fixed list.

Identity: row ids hash `key`, a fingerprint of what the model computes (config, weights, tokenizer, chat
template; for `engine: openai` also the server URL and served name), not the path string. So a model retrained
into the same folder makes new rows, and the same folder reached by another path reuses the stored ones.
The shipped model keeps its name as its key: its weights are pinned by the package checksum, and stores made
before fingerprints existed keep their rows.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from factory.config import ConfigError

# Files that define the tokenizer and its chat template (any of them may be absent).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SAMPLES_PER_FILE = 16  # blocks read from a weight file that is not safetensors
SAMPLE_BYTES = 1 << 16
TENSOR_SAMPLE = 4096  # bytes read at the start, middle and end of every tensor of a safetensors file


@dataclass
class ModelInfo:
    role: str  # "policy" / "judge" / ..., for messages
    label: str  # what lineage shows: the shipped model's name or the path as configured
    key: str  # what row ids hash: the shipped model's name, or "fp:" + fingerprint
    fingerprint: str
    path: Path
    tokenizer: object
    special_tokens: tuple[str, ...]  # control strings untrusted text must never form
    has_chat_template: bool


def _hash_file(h, path: Path) -> None:
    h.update(path.name.encode())
    h.update(path.read_bytes())


def _sample_weights(h, path: Path) -> None:
    """Names, shapes and dtypes of every tensor and a few sampled blocks of each tensor's data, plus the size:
    training that touches any tensor (even one layer, or only the adapters) changes the fingerprint, while a
    70B model costs a few MB of reads."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if path.suffix != ".safetensors":
            for i in range(SAMPLES_PER_FILE):
                f.seek(max(0, (size - SAMPLE_BYTES) * i // max(1, SAMPLES_PER_FILE - 1)))
                h.update(f.read(SAMPLE_BYTES))
            return
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n)
        h.update(header)
        start = 8 + n
        for name, meta in sorted(json.loads(header).items()):
            if name == "__metadata__":
                continue
            lo, hi = meta["data_offsets"]
            for at in (lo, (lo + hi) // 2, hi - TENSOR_SAMPLE):  # a block at its start, middle and end
                f.seek(start + max(lo, at))
                h.update(f.read(min(TENSOR_SAMPLE, hi - lo)))


def fingerprint(model_dir: Path) -> str:
    """A content fingerprint of a model folder: cheap (a few MB read, whatever the model's size)."""
    h = hashlib.sha256()
    cfg = model_dir / "config.json"
    if cfg.is_file():
        h.update(json.dumps(json.loads(cfg.read_text()), sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            _hash_file(h, model_dir / name)
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            _sample_weights(h, p)
        elif p.is_file() and p.name.endswith(".index.json"):
            _hash_file(h, p)
    return h.hexdigest()[:24]


def control_strings(tokenizer) -> tuple[str, ...]:
    """Every string this tokenizer would turn into one of its added tokens (special or not: Llama 3's
    <|eot_id|>, ChatML's <|im_end|>, Mistral's [INST], Phi-3's <|end|>, Gemma's <end_of_turn>, Qwen 3's <think>),
    longest first. Found by the tokenizer itself, so a family factory has never seen is covered too."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        found.add(str(tok))
    return tuple(sorted((t for t in found if t and len(t) > 1 and not t.isspace()), key=lambda t: (-len(t), t)))


def answer_cue(tokenizer, cue: str, labels: tuple[str, ...] = ("A", "B")) -> tuple[list[int], list[int]]:
    """How this tokenizer continues `cue` with each answer label: (ids the prompt ends with, one answer id
    per label). The answer ids are what `cue + label` tokenizes to past the longest prefix it shares with the
    ids of `cue` alone: "(A" is one token in Llama 3 and Qwen 2 (so the cue's final "(" is dropped from the
    prompt and " (A" / " (B" are scored), SentencePiece vocabularies write "A" after "(" (not "▁A"), Gemma
    writes "(" then "A". Raises ValueError when the labels do not continue the cue as one distinct token each."""
    base = tokenizer(cue, add_special_tokens=False)["input_ids"]
    full = [tokenizer(cue + label, add_special_tokens=False)["input_ids"] for label in labels]
    k = len(base)
    for ids in full:
        common = 0
        while common < min(len(ids), len(base)) and ids[common] == base[common]:
            common += 1
        k = min(k, common)
    tails = [ids[k:] for ids in full]
    if any(len(t) != 1 for t in tails) or len({t[0] for t in tails}) != len(labels):
        shown = ", ".join(f"{label!r} -> {tokenizer.convert_ids_to_tokens(t)}" for label, t in zip(labels, tails))
        raise ValueError(f"the answer labels do not continue {cue!r} as one distinct token each ({shown})")
    return base[:k], [t[0] for t in tails]


def load_model_info(cfg, role: str) -> ModelInfo:
    """Resolve the model, load its tokenizer and fingerprint it; bad input is a ConfigError (exit 2)."""
    from transformers import AutoTokenizer

    from factory.models import DEFAULT_MODEL_NAME, resolve_model

    shipped = cfg.path in ("default", DEFAULT_MODEL_NAME)
    try:
        path = resolve_model(cfg.path)
    except FileNotFoundError as e:
        raise ConfigError(f"models.{role}.path: {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's folder
        raise ConfigError(f"models.{role}.path: cannot load a tokenizer from {path} ({type(e).__name__}: "
                          f"{str(e)[:200]}); the folder needs the model's tokenizer files") from e
    fp = fingerprint(path)
    if cfg.engine == "openai":  # a remote model is the server and the name it serves, read with this tokenizer
        fp = hashlib.sha256(f"{fp}|{cfg.base_url}|{cfg.api_model or cfg.path}".encode()).hexdigest()[:24]
    return ModelInfo(role=role, label=DEFAULT_MODEL_NAME if shipped else cfg.path,
                     key=DEFAULT_MODEL_NAME if shipped else f"fp:{fp}", fingerprint=fp, path=path, tokenizer=tok,
                     special_tokens=control_strings(tok), has_chat_template=bool(getattr(tok, "chat_template", None)))


def check_chat_template(info: ModelInfo, prompt_format: str) -> None:
    if prompt_format == "chat" and not info.has_chat_template:
        raise ConfigError(
            f"models.{info.role}: {info.label} has no chat template, so prompt_format 'chat' cannot render its "
            f"prompts. Set models.{info.role}.prompt_format: plain (few-shot Human/Assistant text, right for base "
            "models), or add the instruct model's chat template to the folder (chat_template.jinja, or "
            "'chat_template' in tokenizer_config.json).")


def check_judge_answers(info: ModelInfo, cue: str, what: str = "label.mode logprob/cot") -> tuple[list[int], list[int]]:
    """The judge's answer tokens, or a ConfigError naming the model and what to change."""
    try:
        return answer_cue(info.tokenizer, cue)
    except ValueError as e:
        raise ConfigError(
            f"models.{info.role}: {info.label} cannot be used as a log-probability judge ({what}): {e}. Use "
            "label.mode: rubric (the judge writes scores as text), or a judge model with another tokenizer.") from e
