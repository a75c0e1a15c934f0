"""Unit tests for factory.prompts.load_prompts: formats, column mapping, error messages, ids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from factory.config import ConfigError, PromptsConfig
from factory.prompts import load_prompts
from factory.store import row_id

RECORDS = [
    {"q": "What is the boiling point of water?", "qid": "a1", "topic": "science"},
    {"q": "Name a prime number larger than 10.", "qid": "a2", "topic": "math"},
    {"q": "Who wrote Hamlet?", "qid": "a3", "topic": "literature"},
]


def _cfg(path, **kw) -> PromptsConfig:
    return PromptsConfig(path=str(path), **kw)


def _check_mapped(rows: list[dict], path: Path):
    """The column mapping: text from 'q', source_id from 'qid', other columns kept in meta."""
    assert [r["text"] for r in rows] == [r["q"] for r in RECORDS]
    assert [r["source_id"] for r in rows] == [r["qid"] for r in RECORDS]
    assert [json.loads(r["meta"]) for r in rows] == [{"topic": r["topic"]} for r in RECORDS]
    assert all(r["source"] == str(path) for r in rows)
    assert [r["prompt_id"] for r in rows] == [row_id("prompt", r["q"]) for r in RECORDS]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- formats -----------------------------------------------------------------------------------------

def test_jsonl_with_column_mapping(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", RECORDS)
    rows = load_prompts(_cfg(path, column="q", id_column="qid"))
    _check_mapped(rows, path)


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[0]) + "\n\n   \n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    rows = load_prompts(_cfg(path, column="q"))
    assert [r["text"] for r in rows] == [RECORDS[0]["q"], RECORDS[1]["q"]]


def test_csv_with_column_mapping(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["qid", "q", "topic"])
        w.writeheader()
        w.writerows(RECORDS)
    rows = load_prompts(_cfg(path, column="q", id_column="qid"))
    _check_mapped(rows, path)


def test_csv_keeps_quoted_commas_and_newlines(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt\n"Hello, world"\n"two\nlines"\n', encoding="utf-8")
    rows = load_prompts(_cfg(path))
    assert [r["text"] for r in rows] == ["Hello, world", "two\nlines"]


def test_tsv_is_read_with_tabs(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("prompt\tid\nHello, there\t7\n", encoding="utf-8")
    rows = load_prompts(_cfg(path, id_column="id"))
    assert rows[0]["text"] == "Hello, there"
    assert rows[0]["source_id"] == "7"


def test_parquet_with_column_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    rows = load_prompts(_cfg(path, column="q", id_column="qid"))
    _check_mapped(rows, path)


def test_integer_id_column_becomes_string(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi there", "n": 12}])
    rows = load_prompts(_cfg(path, id_column="n"))
    assert rows[0]["source_id"] == "12"


def test_datasets_folder_with_column_mapping(tmp_path):
    from datasets import Dataset

    path = tmp_path / "ds"
    Dataset.from_dict({k: [r[k] for r in RECORDS] for k in ("q", "qid", "topic")}).save_to_disk(str(path))
    rows = load_prompts(_cfg(path, column="q", id_column="qid"))
    _check_mapped(rows, path)


def test_datasets_dict_selects_split(tmp_path):
    from datasets import Dataset, DatasetDict

    path = tmp_path / "dsd"
    DatasetDict({
        "train": Dataset.from_dict({"prompt": ["train prompt one", "train prompt two"]}),
        "test": Dataset.from_dict({"prompt": ["test prompt"]}),
    }).save_to_disk(str(path))
    assert [r["text"] for r in load_prompts(_cfg(path))] == ["train prompt one", "train prompt two"]
    assert [r["text"] for r in load_prompts(_cfg(path, split="test"))] == ["test prompt"]


def test_datasets_dict_unknown_split_lists_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    path = tmp_path / "dsd"
    DatasetDict({"train": Dataset.from_dict({"prompt": ["x y"]}),
                 "validation": Dataset.from_dict({"prompt": ["z"]})}).save_to_disk(str(path))
    with pytest.raises(ConfigError) as ei:
        load_prompts(_cfg(path, split="test"))
    msg = str(ei.value)
    assert "'test'" in msg and "train" in msg and "validation" in msg


def test_explicit_format_overrides_extension(tmp_path):
    path = _write_jsonl(tmp_path / "prompts.txt", [{"prompt": "hello"}])
    with pytest.raises(ConfigError, match="format"):
        load_prompts(_cfg(path))
    assert [r["text"] for r in load_prompts(_cfg(path, format="jsonl"))] == ["hello"]


# ---- errors ------------------------------------------------------------------------------------------

def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "prompts.jsonl"
    with pytest.raises(ConfigError) as ei:
        load_prompts(_cfg(path))
    assert str(path) in str(ei.value)
    assert "not found" in str(ei.value)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_file_is_config_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="no prompts") as ei:
        load_prompts(_cfg(path))
    assert str(path) in str(ei.value)


def test_whitespace_only_jsonl_is_config_error(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no prompts"):
        load_prompts(_cfg(path))


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.csv"])
def test_non_utf8_bytes_name_the_line(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        lines = [b'{"prompt": "one"}', b'{"prompt": "two"}', b'{"prompt": "caf\xe9"}', b'{"prompt": "four"}']
    else:
        lines = [b"prompt", b"two", b"caf\xe9", b"four"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ConfigError) as ei:
        load_prompts(_cfg(path))
    msg = str(ei.value)
    assert "line 3" in msg
    assert "UTF-8" in msg
    assert str(path) in msg


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_prompts(_cfg(path))
    msg = str(ei.value)
    assert "line 4" in msg
    assert "not valid JSON" in msg


def test_json_line_that_is_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n["prompt", "b"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2.*JSON object"):
        load_prompts(_cfg(path))


def test_missing_column_names_column_and_lists_columns(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", RECORDS)
    with pytest.raises(ConfigError) as ei:
        load_prompts(_cfg(path, column="question"))
    msg = str(ei.value)
    assert "'question'" in msg
    assert "line 1" in msg
    for col in ("q", "qid", "topic"):
        assert col in msg.split("columns are")[1]


def test_missing_column_in_later_row_names_that_row(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}])
    with pytest.raises(ConfigError, match="line 3"):
        load_prompts(_cfg(path))


def test_empty_prompt_text_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "   "}])
    with pytest.raises(ConfigError, match="line 2.*empty"):
        load_prompts(_cfg(path))


def test_non_string_prompt_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": 42}])
    with pytest.raises(ConfigError, match="not text"):
        load_prompts(_cfg(path))


# ---- ids, duplicates, limit --------------------------------------------------------------------------

def test_duplicate_prompt_texts_collapse_to_one_id(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Same question?", "id": "first"},
        {"prompt": "Other question?", "id": "second"},
        {"prompt": "  Same question?  ", "id": "third"},  # same after stripping
    ])
    rows = load_prompts(_cfg(path, id_column="id"))
    assert [r["text"] for r in rows] == ["Same question?", "Other question?"]
    assert len({r["prompt_id"] for r in rows}) == 2
    assert rows[0]["source_id"] == "first"  # the first occurrence wins


def test_limit_keeps_first_n_unique_prompts(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in ["a", "a", "b", "c", "d"]])
    rows = load_prompts(_cfg(path, limit=2))
    assert [r["text"] for r in rows] == ["a", "b"]
    assert len(load_prompts(_cfg(path, limit=100))) == 4


def test_prompt_ids_are_stable_content_hashes(tmp_path):
    p1 = _write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Stable text", "id": "x"}, {"prompt": "Other"}])
    p2 = tmp_path / "two.csv"
    p2.write_text("prompt\nUnrelated\nStable text\n", encoding="utf-8")
    a = {r["text"]: r["prompt_id"] for r in load_prompts(_cfg(p1))}
    again = {r["text"]: r["prompt_id"] for r in load_prompts(_cfg(p1))}
    b = {r["text"]: r["prompt_id"] for r in load_prompts(_cfg(p2))}
    assert a == again
    # Same text in another file, another format, another position, another source id: same id.
    assert a["Stable text"] == b["Stable text"]
    assert a["Stable text"] != a["Other"]
    assert a["Stable text"] == row_id("prompt", "Stable text")


@pytest.mark.parametrize("name,body", [
    ("bom.csv", "prompt,id\nhello there,1\n"),
    ("bom.jsonl", '{"prompt": "hello there", "id": 1}\n'),
])
def test_utf8_file_with_byte_order_mark_loads(tmp_path, name, body):
    # Excel's "CSV UTF-8" and many Windows tools write a BOM; the file is valid UTF-8 and should load
    # with the header/first line read normally (not as a column named '\ufeffprompt').
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    rows = load_prompts(_cfg(path, id_column="id"))
    assert [r["text"] for r in rows] == ["hello there"]
    assert rows[0]["source_id"] == "1"


# ---- every JSONL reader (factory/jsonl.py): the same errors, naming the file and the line -----------------------

def _read_prompts(path):
    return load_prompts(_cfg(path))


def _read_benchmark(path):
    from factory.config import BenchmarkConfig
    from factory.decontam import load_benchmark

    return load_benchmark(BenchmarkConfig(name="b", path=str(path)))


def _read_gold(path):
    from factory.calibration import load_gold

    return load_gold(path)


def _read_eval_set(path):
    from factory.train.eval_sets import load_set

    return load_set(str(path))


def _read_sft_mix(path):
    from factory.train.sft import _user_rows

    return _user_rows(str(path))


GOLD = {"id": "g1", "prompt": "Hi?", "a": "Hello!", "b": "Go away.", "preferred": "a", "kind": "helpful",
        "error": "rude"}
READERS = {_read_prompts: {"prompt": "Hi?"}, _read_benchmark: {"prompt": "Hi?"}, _read_gold: GOLD,
           _read_eval_set: {"id": "e1", "prompt": "Hi?"}, _read_sft_mix: {"prompt": "Hi?", "completion": "Hello!"}}


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("bad, line, message", [
    (b'{"prompt": oops}', 3, "not valid JSON (Expecting value at column 12); each line must be one JSON object"),
    (b'["prompt", "b"]', 3, "expected a JSON object, got an array; each line must be one JSON object"),
    (b'"just text"', 3, "expected a JSON object, got a string"),
    (b'{"prompt": "caf\xe9"}', 3, "bytes that are not UTF-8 (invalid continuation byte at byte 15); re-encode"),
], ids=["json", "array", "string", "utf8"])
def test_every_jsonl_reader_names_the_file_and_line(tmp_path, reader, bad, line, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(READERS[reader]).encode() + b"\n\n" + bad + b"\n")  # a blank line 2 still counts
    with pytest.raises(ConfigError) as ei:
        reader(path)
    assert f"{path}, line {line}: {message}" in str(ei.value)


def test_a_byte_order_mark_and_blank_lines_are_not_records(tmp_path):
    from factory import jsonl

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n  \n\n{"prompt": "b"}\r\n')
    assert list(jsonl.records(path)) == [(1, {"prompt": "a"}), (4, {"prompt": "b"})]
    assert [r["text"] for r in load_prompts(_cfg(path))] == ["a", "b"]
