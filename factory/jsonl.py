"""Reading JSONL files (one JSON object per line) for every reader of user files: prompts, benchmark files, the
judge's gold set, the eval sets, SFT mix data.

`records(path)` yields (line number, object) one line at a time (a million prompts are never all in memory); blank
lines are skipped. Bad input is a ConfigError (the CLI exits 2) naming the file and the line, what is wrong and what
to do: bytes that are not UTF-8, a line that is not JSON, a line that is JSON but not an object. `lines(path)` is
the decoding underneath, also used for CSV.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from factory.config import ConfigError

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def where(path: str | Path, line: int) -> str:
    """How every reader names a line of a text file in its errors: '<path>, line <n>'."""
    return f"{path}, line {line}"


def lines(path: str | Path, context: str = "") -> Iterator[tuple[int, str]]:
    """(line number, text without its newline) of each line, decoded as UTF-8 one at a time; a UTF-8 byte-order mark
    (as Excel and Windows write) is dropped. `context` prefixes error messages (e.g. the config field)."""
    path = Path(path)
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{context}{where(path, n)}: bytes that are not UTF-8 ({e.reason} at byte {e.start});"
                                  " re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e
            yield n, text.removesuffix("\n")


def records(path: str | Path, context: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line. `context` prefixes error messages (e.g. 'redteam_set: ')."""
    for n, line in lines(path, context):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{context}{where(path, n)}: not valid JSON ({e.msg} at column {e.colno}); each line "
                              "must be one JSON object") from e
        if not isinstance(rec, dict):
            raise ConfigError(f"{context}{where(path, n)}: expected a JSON object, got "
                              f"{_JSON_TYPES.get(type(rec), type(rec).__name__)}; each line must be one JSON object "
                              '({"field": value, ...})')
        yield n, rec
