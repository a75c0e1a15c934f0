"""Decontamination logic (factory/decontam.py, factory/stages/decontaminate.py) without a model: normalisation,
word n-grams (the SQL against the Python reference), benchmark files and their config errors, and the flagging
of a page of texts against a benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from factory.cli import app
from factory.config import BenchmarkConfig, ConfigError, DecontaminationConfig
from factory.decontam import GRAMS_SQL, check_benchmarks, load_benchmark, ngrams, normalise
from factory.stages.decontaminate import benchmark_grams, flag_page

REPO = Path(__file__).parents[2]
QUESTION = "Please explain in simple words why the sky looks blue during a clear summer day"


def test_normalise_folds_case_width_punctuation_and_spacing():
    assert normalise("  The SKY, is\tBLUE!!  ") == "the sky is blue"
    assert normalise("ＦＵＬＬ－ｗｉｄｔｈ　ｔｅｘｔ") == "full width text"  # NFKC: full-width letters and space
    assert normalise("Straße") == "strasse"  # case-folding, not just lower()
    assert normalise("Don’t stop—it's fine…") == "dont stop its fine"  # apostrophes dropped, dashes split words
    assert normalise("snake_case and ¿qué?") == "snake case and qué"
    assert normalise("?!...") == ""


def test_ngrams_of_long_short_and_tiny_texts():
    words = " ".join(f"w{i}" for i in range(15))
    grams = ngrams(words, 13, 8)
    assert grams == [" ".join(f"w{i}" for i in range(s, s + 13)) for s in range(3)]
    assert ngrams("one two three four five six seven eight", 13, 8) == ["one two three four five six seven eight"]
    assert ngrams("one two three four five six seven", 13, 8) == []  # under min_words: not checked
    assert ngrams("", 13, 1) == []


@pytest.mark.parametrize("n,min_words", [(13, 8), (3, 2), (1, 1), (5, 5)])
def test_sql_grams_are_the_python_reference(n, min_words):
    texts = ["a b c d e f g h i j k l m n o p", "a b", "one two three", "", "x y z w v u t s r q p o n m",
             normalise("Is this the real life? Is this just fantasy? Caught in a landslide, no escape from reality")]
    con = duckdb.connect()
    con.register("src", pa.table({"id": [str(i) for i in range(len(texts))], "norm": texts}))
    got = {}
    for i, gram in con.execute(GRAMS_SQL.format(src="src"), {"n": n, "min_words": min_words}).fetchall():
        got.setdefault(i, []).append(gram)
    want = {str(i): ngrams(t, n, min_words) for i, t in enumerate(texts) if ngrams(t, n, min_words)}
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_page_is_flagged_for_a_verbatim_copy_and_not_for_unrelated_text(tmp_path):
    bench = _jsonl(tmp_path / "b.jsonl", [{"id": 1, "question": QUESTION.upper() + "!!!"},
                                         {"id": 2, "question": "Name the largest moon of Saturn and say who found it"}])
    cfg = DecontaminationConfig(benchmarks=[BenchmarkConfig(name="mine", path=str(bench))])
    mem = benchmark_grams(cfg)
    texts = {"copied": f"Hello there. {QUESTION.lower()}? Thanks in advance",  # contains the item: 13-grams hit
             "short": "please, explain in SIMPLE words why",  # 6 words: not checked (min_words 8)
             "other": "How do I bake sourdough bread at home with a starter and a cold oven at night?"}
    hits = {i: (b, g, h) for i, b, g, h in flag_page(mem, cfg, list(texts), list(texts.values()))}
    assert set(hits) == {"copied"}
    bench_name, gram, n = hits["copied"]
    assert bench_name == "mine" and n == len(QUESTION.split()) - 13 + 1 and gram in normalise(QUESTION)


def test_a_short_item_matches_only_the_same_whole_text(tmp_path):
    bench = _jsonl(tmp_path / "b.jsonl", [{"q": "What is the boiling point of water at sea level?"}])
    cfg = DecontaminationConfig(benchmarks=[BenchmarkConfig(name="short", path=str(bench))])
    hits = flag_page(benchmark_grams(cfg), cfg, ["same", "longer"],
                     ["what is the BOILING point of water, at sea level", "So: what is the boiling point of water "
                      "at sea level? I always forget."])
    assert [h[0] for h in hits] == ["same"]


def test_default_columns_are_every_text_field_including_lists(tmp_path):
    path = _jsonl(tmp_path / "mt.jsonl", [{"question_id": 81, "category": "writing",
                                           "turns": ["First turn text here", "Second turn text"]}])
    assert load_benchmark(BenchmarkConfig(name="mt", path=str(path))) == [
        "writing", "First turn text here", "Second turn text"]
    assert load_benchmark(BenchmarkConfig(name="mt", path=str(path), columns=["turns"])) == [
        "First turn text here", "Second turn text"]


def test_parquet_and_datasets_folders_are_read(tmp_path):
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    pq.write_table(pa.table({"prompt": ["alpha beta", "gamma"], "n": [1, 2]}), tmp_path / "b.parquet")
    assert load_benchmark(BenchmarkConfig(name="pq", path=str(tmp_path / "b.parquet"))) == ["alpha beta", "gamma"]
    DatasetDict({"test": Dataset.from_dict({"instruction": ["one"]}),
                 "dev": Dataset.from_dict({"instruction": ["two"]})}).save_to_disk(str(tmp_path / "ds"))
    assert sorted(load_benchmark(BenchmarkConfig(name="ds", path=str(tmp_path / "ds")))) == ["one", "two"]


def test_bad_benchmarks_are_config_errors_naming_the_file_and_column(tmp_path):
    with pytest.raises(ConfigError, match=r"benchmarks\[0\] \(gone\).*missing.jsonl not found"):
        check_benchmarks(DecontaminationConfig(benchmarks=[BenchmarkConfig(name="gone", path=str(tmp_path / "missing.jsonl"))]))
    path = _jsonl(tmp_path / "b.jsonl", [{"prompt": "some text"}])
    with pytest.raises(ConfigError, match=r"no column 'question' in .*b.jsonl; its columns are prompt"):
        load_benchmark(BenchmarkConfig(name="b", path=str(path), columns=["question"]))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_benchmark(BenchmarkConfig(name="bad", path=str(tmp_path / "bad.jsonl")))
    numbers = _jsonl(tmp_path / "n.jsonl", [{"id": 1}])
    with pytest.raises(ConfigError, match="has no text"):
        load_benchmark(BenchmarkConfig(name="n", path=str(numbers)))


def test_config_checks_names_sizes_and_keys():
    with pytest.raises(ValidationError, match="given twice"):
        DecontaminationConfig(benchmarks=[BenchmarkConfig(name="a", path="x"), BenchmarkConfig(name="a", path="y")])
    with pytest.raises(ValidationError, match="min_words"):
        DecontaminationConfig(ngram=5, min_words=6)
    with pytest.raises(ValidationError):
        DecontaminationConfig(check=["critiques"])
    with pytest.raises(ValidationError):
        BenchmarkConfig(name="a", path="x", colums=["q"])


def test_cli_exits_2_on_a_missing_benchmark_before_any_model_loads(tmp_path, monkeypatch):
    import factory.pipeline

    def no_models(cfg):  # reaching the models (tokenizers, engines) would be too late
        raise AssertionError("models were checked before the benchmarks")

    monkeypatch.setattr(factory.pipeline, "check_models", no_models)
    cfg = yaml.safe_load((REPO / "pipelines" / "quickstart.yaml").read_text())
    cfg["store"] = str(tmp_path / "s.duckdb")
    cfg["prompts"]["path"] = str(REPO / cfg["prompts"]["path"])
    cfg["decontamination"] = {"benchmarks": [{"name": "mt-bench", "path": str(tmp_path / "mt_bench.jsonl")}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2, result.output
    assert "mt-bench" in result.output and "mt_bench.jsonl not found" in result.output
    assert not (tmp_path / "s.duckdb").exists()
