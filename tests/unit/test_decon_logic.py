"""Decontamination logic (factory/decontam.py, factory/stages/decontaminate.py) without a model: normalisation,
word n-grams (the SQL against the Python reference), short benchmark items (the numpy search against the Python
reference), benchmark files and their config errors, the flagging of a page of texts against a benchmark, and the
stage's `contamination` rows with their kind."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from factory.cli import app
from factory.config import BenchmarkConfig, ConfigError, DecontaminationConfig
from factory.decontam import GRAMS_SQL, ShortItems, check_benchmarks, contains_item, load_benchmark, ngrams, normalise
from factory.stages.decontaminate import benchmark_index, flag_page

REPO = Path(__file__).parents[2]
QUESTION = "Please explain in simple words why the sky looks blue during a clear summer day"


def test_normalise_folds_case_width_punctuation_and_spacing():
    assert normalise("  The SKY, is\tBLUE!!  ") == "the sky is blue"
    assert normalise("ＦＵＬＬ－ｗｉｄｔｈ　ｔｅｘｔ") == "full width text"  # NFKC: full-width letters and space
    assert normalise("Straße") == "strasse"  # case-folding, not just lower()
    assert normalise("Don’t stop—it's fine…") == "dont stop its fine"  # apostrophes dropped, dashes split words
    assert normalise("snake_case and ¿qué?") == "snake case and qué"
    assert normalise("?!...") == ""


def test_ngrams_of_long_short_and_empty_texts():
    words = " ".join(f"w{i}" for i in range(15))
    grams = ngrams(words, 13)
    assert grams == [" ".join(f"w{i}" for i in range(s, s + 13)) for s in range(3)]
    assert ngrams(" ".join(f"w{i}" for i in range(13)), 13) == [" ".join(f"w{i}" for i in range(13))]
    assert ngrams("one two three four five six seven eight", 13) == []  # shorter than n: no n-gram
    assert ngrams("", 13) == []


@pytest.mark.parametrize("n", [13, 3, 2, 1, 5])
def test_sql_grams_are_the_python_reference(n):
    texts = ["a b c d e f g h i j k l m n o p", "a b", "one two three", "", "x y z w v u t s r q p o n m",
             normalise("Is this the real life? Is this just fantasy? Caught in a landslide, no escape from reality")]
    con = duckdb.connect()
    con.register("src", pa.table({"id": [str(i) for i in range(len(texts))], "norm": texts}))
    got = {}
    for i, gram in con.execute(GRAMS_SQL.format(src="src"), {"n": n}).fetchall():
        got.setdefault(i, []).append(gram)
    want = {str(i): ngrams(t, n) for i, t in enumerate(texts) if ngrams(t, n)}
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_page_is_flagged_for_a_verbatim_copy_and_not_for_unrelated_text(tmp_path):
    bench = _jsonl(tmp_path / "b.jsonl", [{"id": 1, "question": QUESTION.upper() + "!!!"},
                                         {"id": 2, "question": "Name the largest moon of Saturn and say who found it"}])
    cfg = DecontaminationConfig(benchmarks=[BenchmarkConfig(name="mine", path=str(bench))])
    index = benchmark_index(cfg)
    texts = {"copied": f"Hello there. {QUESTION.lower()}? Thanks in advance",  # contains the item: 13-grams hit
             "part": "please, explain in SIMPLE words why",  # 6 words of a long item: no n-gram of it
             "other": "How do I bake sourdough bread at home with a starter and a cold oven at night?"}
    hits = {i: (b, k, g, h) for i, b, k, g, h in flag_page(index, cfg, list(texts), list(texts.values()))}
    assert set(hits) == {"copied"}
    bench_name, kind, gram, n = hits["copied"]
    assert bench_name == "mine" and kind == "ngram" and n == len(QUESTION.split()) - 13 + 1
    assert gram in normalise(QUESTION)


SHORT = "What is the capital of France?"  # 6 words: a short item (fewer than 13, at least min_words 6)


def _short_bench(tmp_path, *items, **cfg) -> DecontaminationConfig:
    bench = _jsonl(tmp_path / "b.jsonl", [{"q": q} for q in items])
    return DecontaminationConfig(benchmarks=[BenchmarkConfig(name="short", path=str(bench))], **cfg)


def test_a_short_item_is_flagged_inside_a_longer_text(tmp_path):
    cfg = _short_bench(tmp_path, SHORT)
    texts = {"same": "what is the CAPITAL of france",
             "inside": "Quick quiz for the kids: what is the capital of France? And of Spain? I always forget.",
             "at-end": "Tell me, WHAT IS THE CAPITAL OF ... France!",
             "other": "What is the capital of Spain?"}
    hits = flag_page(benchmark_index(cfg), cfg, list(texts), list(texts.values()))
    assert hits == [(i, "short", "short_item", "what is the capital of france", 1)
                    for i in ("at-end", "inside", "same")]


def test_a_short_item_is_not_flagged_inside_other_words(tmp_path):
    cfg = _short_bench(tmp_path, SHORT, "pen is red")
    texts = {"longer-word": "What is the capital of Frances county in Nebraska?",
             "joined": "Whatis the capital of France?",
             "substring": "The open is reddish today",  # "pen is red" as characters, not as words
             "split": "What is the capital, I mean the one of France?"}
    assert flag_page(benchmark_index(cfg), cfg, list(texts), list(texts.values())) == []
    assert contains_item(normalise("a pen is red"), "pen is red")
    assert not contains_item("the open is reddish", "pen is red")


def test_a_short_item_below_min_words_is_ignored(tmp_path):
    texts = ["Paris is lovely in spring", "I want to visit Paris France soon"]
    cfg = _short_bench(tmp_path, "Paris France", SHORT)  # 2 words: under min_words (6)
    assert flag_page(benchmark_index(cfg), cfg, ["a", "b"], texts) == []
    cfg = _short_bench(tmp_path, "Paris France", SHORT, min_words=2)
    assert flag_page(benchmark_index(cfg), cfg, ["a", "b"], texts) == [("b", "short", "short_item", "paris france", 1)]
    cfg = _short_bench(tmp_path, SHORT, min_words=7)  # 6 words: ignored
    assert flag_page(benchmark_index(cfg), cfg, ["c"], [SHORT]) == []


def test_a_text_with_an_ngram_and_short_items_is_one_ngram_row_counting_all(tmp_path):
    cfg = _short_bench(tmp_path, QUESTION, SHORT, "the capital of France", min_words=3)
    text = f"{QUESTION}. Also: what is the capital of France?"
    [(i, bench, kind, gram, hits)] = flag_page(benchmark_index(cfg), cfg, ["t"], [text])
    assert (i, bench, kind) == ("t", "short", "ngram") and gram in normalise(QUESTION)
    assert hits == len(QUESTION.split()) - 13 + 1 + 2  # its 13-grams and the two short items


@pytest.mark.parametrize("n,min_words", [(13, 3), (5, 1), (4, 3), (3, 2)])
def test_short_item_search_is_the_python_reference(n, min_words):
    rng = np.random.default_rng(n)
    vocab = [f"w{i}" for i in range(8)] + ["x"]

    def text(lo, hi):
        return " ".join(rng.choice(vocab, rng.integers(lo, hi + 1)))

    items = [(b, text(1, n + 1)) for b in ("a", "b") for _ in range(40)] + [("a", "")]
    texts = [text(0, 40) for _ in range(300)] + ["", "w1", "w1w2 w3"]
    found = ShortItems(items, n, min_words).find(texts)
    want = sorted({(t, b, item) for t, x in enumerate(texts) for b, item in items
                   if min_words <= len(item.split()) < n and contains_item(x, item)})
    assert found == want and len(want) > 10


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


def test_the_stage_stores_each_flag_with_its_kind_and_a_rerun_copies_them(tmp_path):
    from factory.stages.common import Context
    from factory.stages.decontaminate import decontaminate
    from factory.store import Store, now, row_id

    prompts = {"copied": f"Hi! {QUESTION}", "short": f"Quiz time: {SHORT} Take your time.", "clean": "Bake me a cake"}
    cfg = _short_bench(tmp_path, QUESTION, SHORT)
    with Store.open(tmp_path / "s.duckdb") as store:
        flags = []
        for _ in range(2):  # the second run reuses the first one's flags
            run = store.start_run("decon", "pipeline", {}, None)
            ids = {k: row_id("prompt", t) for k, t in prompts.items()}
            store.insert("prompts", [{"prompt_id": ids[k], "text": t, "created_at": now()} for k, t in prompts.items()])
            store.add_members(run, "prompts", list(ids.values()))
            assert decontaminate(Context(store=store, run_id=run, seed=0, chunk_size=2), cfg) == {"short": 2}
            flags.append(store.run_sql("SELECT row_id, tbl, benchmark, kind, ngram, hits FROM contamination "
                                       "WHERE run_id = ? ORDER BY kind", [run]))
    assert flags[0] == flags[1] == [
        (ids["copied"], "prompts", "short", "ngram", min(ngrams(normalise(QUESTION), 13)), len(QUESTION.split()) - 12),
        (ids["short"], "prompts", "short", "short_item", normalise(SHORT), 1)]
