"""Read prompts from JSONL, CSV, Parquet or a local `datasets` folder, with a column mapping.

Errors name the file, the line (for text formats) and what to do. Nothing here writes to the store.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from factory import jsonl
from factory.config import ConfigError, PromptsConfig
from factory.conversation import ConversationError, canonical, parse_hh, transcript, validate_messages
from factory.store import now, row_id

BATCH = 50_000  # prompts per batch read and written


def _detect(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "datasets"
    ext = path.suffix.lower()
    for name, exts in {"jsonl": (".jsonl", ".json", ".ndjson"), "csv": (".csv", ".tsv"),
                       "parquet": (".parquet", ".pq")}.items():
        if ext in exts:
            return name
    raise ConfigError(f"{path}: cannot tell the format from the extension; set prompts.format to one of "
                      "jsonl, csv, parquet, datasets")


def _records(path: Path, fmt: str, cfg: PromptsConfig) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs, read as they are needed; `where` names the line or row for error messages."""
    if fmt == "jsonl":
        for i, rec in jsonl.records(path):
            yield f"line {i}", rec
    elif fmt == "csv":
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        reader = csv.DictReader((line + "\n" for _, line in jsonl.lines(path)), dialect=dialect)
        for r in reader:
            yield f"line {reader.line_num}", dict(r)
    elif fmt == "parquet":
        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH):
            for r in batch.to_pylist():
                yield f"row {i}", r
                i += 1
    elif fmt == "datasets":
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if cfg.split not in ds:
                raise ConfigError(f"{path}: split {cfg.split!r} not found; available: {', '.join(ds)} (prompts.split)")
            ds = ds[cfg.split]
        for i, r in enumerate(ds):
            yield f"row {i}", r
    else:
        raise ConfigError(f"unknown prompts format {fmt!r}")


def _conversation(value, cfg: PromptsConfig, path: Path, where: str) -> tuple[str, str | None]:
    """(text, messages JSON or None) of one prompt; a malformed conversation names the file and line."""
    style = cfg.style
    if style == "auto":
        style = "messages" if isinstance(value, list) else "text"
    try:
        if style == "text":
            if not isinstance(value, str) or not value.strip():
                raise ConversationError(f"the prompt in column {cfg.column!r} is empty or not text"
                                        + (" (a list: set prompts.style: messages)" if isinstance(value, list) else ""))
            return value.strip(), None
        if style == "messages":
            if isinstance(value, str):  # CSV and Parquet carry the list as JSON text
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ConversationError(f"column {cfg.column!r} is not a JSON list of messages ({e.msg})") from e
            turns = validate_messages(value)
        else:
            turns = parse_hh(value)
    except ConversationError as e:
        raise ConfigError(f"{path}, {where}: {e} (prompts.column {cfg.column!r}, prompts.style {cfg.style!r})") from e
    if len(turns) == 1:
        return turns[0]["content"], None
    return transcript(turns), canonical(turns)


def iter_prompts(cfg: PromptsConfig, batch: int = BATCH) -> Iterator[list[dict]]:
    """Prompt rows ready for the `prompts` table, `batch` at a time, in the file's order; ids are hashes of the text,
    duplicates collapse. A bad record raises ConfigError when it is reached."""
    path = Path(cfg.path)
    if not path.exists():
        raise ConfigError(f"prompts file {path} not found (prompts.path)")
    fmt = _detect(path, cfg.format)
    rows, seen, created, source = [], set(), now(), str(path)
    for where, rec in _records(path, fmt, cfg):
        if cfg.column not in rec:
            raise ConfigError(f"{path}, {where}: no column {cfg.column!r}; columns are {', '.join(map(str, rec))} "
                              "(set prompts.column)")
        text, messages = _conversation(rec[cfg.column], cfg, path, where)
        # A single user turn keeps the id of its text (stores made before conversations existed stay valid).
        pid = row_id("prompt", text) if messages is None else row_id("prompt", "messages", messages)
        if pid in seen:
            continue
        seen.add(pid)
        if cfg.id_column and cfg.id_column not in rec:
            raise ConfigError(f"{path}, {where}: no id column {cfg.id_column!r} (prompts.id_column); "
                              f"columns are {', '.join(map(str, rec))}")
        source_id = rec.get(cfg.id_column) if cfg.id_column else None
        meta = {k: v for k, v in rec.items() if k not in (cfg.column, cfg.id_column)}
        rows.append({"prompt_id": pid, "text": text, "messages": messages, "source": source, "source_id":
                     None if source_id is None else str(source_id),
                     "meta": json.dumps(meta, default=str) if meta else "{}", "run_id": None, "created_at": created})
        if len(rows) >= batch:
            yield rows
            rows = []
        if cfg.limit and len(seen) >= cfg.limit:
            break
    if rows:
        yield rows
    if not seen:
        raise ConfigError(f"prompts file {path} has no prompts; add one per line/row")


def load_prompts(cfg: PromptsConfig) -> list[dict]:
    """Every prompt row at once (small inputs, tests); a run stages them on disk instead (`stage_prompts`)."""
    return [r for part in iter_prompts(cfg) for r in part]


# The `prompts` table's columns, as stage_prompts writes them (the store adds run_id).
SCHEMA = pa.schema([("prompt_id", pa.string()), ("text", pa.string()), ("messages", pa.string()),
                    ("source", pa.string()), ("source_id", pa.string()), ("meta", pa.string()),
                    ("created_at", pa.timestamp("us"))])


def stage_prompts(cfg: PromptsConfig, out: Path) -> int:
    """Read and check every prompt, writing the rows to the Parquet file `out` a batch at a time; returns how many.
    The whole input is checked before the store is touched, and memory stays flat in the file's size (1M prompts
    held as Python rows took ~1.5 GB)."""
    n = 0
    with pq.ParquetWriter(out, SCHEMA) as writer:
        for part in iter_prompts(cfg):
            writer.write_table(pa.Table.from_pylist(part, schema=SCHEMA))
            n += len(part)
    return n
