"""The CLI on bad input (exit 2, a message naming the file or key, nothing stored lost), a second
writer (exit 1 naming the store), and `factory status`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT
from factory.cli import app
from factory.store import Store

pytestmark = pytest.mark.integration
runner = CliRunner()


def _config(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    data["store"] = str(tmp_path / "store.duckdb")
    data["constitution"] = str(ROOT / "constitutions" / "harmless.yaml")
    data["prompts"]["path"] = str(ROOT / "data" / "quickstart_prompts.jsonl")
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def seeded_store(tmp_path):
    """A store that already holds a row, to check that bad input never loses it."""
    with Store.open(tmp_path / "store.duckdb") as s:
        s.insert("prompts", [{"prompt_id": "keep-me", "text": "an earlier prompt"}])
    return tmp_path / "store.duckdb"


def _prompts_kept(store_path):
    with Store.open(store_path, read_only=True) as s:
        return s.query("SELECT prompt_id FROM prompts") == [{"prompt_id": "keep-me"}]


def _run(args):
    result = runner.invoke(app, args)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_malformed_yaml_exits_2_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [unclosed\n")
    code, out = _run(["run", str(bad)])
    assert code == 2
    assert "bad.yaml" in out and "line" in out


def test_unknown_engine_exits_2_listing_allowed_values(tmp_path, seeded_store):
    code, out = _run(["run", str(_config(tmp_path, models__policy__engine="tensorrt"))])
    assert code == 2
    assert "models.policy.engine" in out and "vllm" in out and "transformers" in out
    assert _prompts_kept(seeded_store)


def test_unknown_key_exits_2(tmp_path):
    code, out = _run(["run", str(_config(tmp_path)), "--set", "critique.roundz=2"])
    assert code == 2 and "critique.roundz" in out and "rounds" in out


def test_missing_prompts_file_exits_2(tmp_path, seeded_store):
    code, out = _run(["run", str(_config(tmp_path, prompts__path=str(tmp_path / "nope.jsonl")))])
    assert code == 2 and "nope.jsonl" in out
    assert _prompts_kept(seeded_store)


def test_empty_prompts_file_exits_2(tmp_path, seeded_store):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out = _run(["run", str(_config(tmp_path, prompts__path=str(empty)))])
    assert code == 2 and "no prompts" in out
    assert _prompts_kept(seeded_store)


def test_non_utf8_prompts_exit_2_naming_the_line(tmp_path, seeded_store):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    code, out = _run(["run", str(_config(tmp_path, prompts__path=str(bad)))])
    assert code == 2 and "line 2" in out and "UTF-8" in out
    assert _prompts_kept(seeded_store)


def test_model_path_not_found_exits_2(tmp_path, seeded_store):
    code, out = _run(["run", str(_config(tmp_path, models__policy__path=str(tmp_path / "no-model")))])
    assert code == 2 and "no-model" in out and "models.policy.path" in out
    assert _prompts_kept(seeded_store)


def test_chat_format_without_a_template_exits_2_before_any_engine(tmp_path, seeded_store):
    """The shipped base model has no chat template: exit 2 naming the model and the fix, in the CLI process
    (no engine started, the store untouched)."""
    code, out = _run(["run", str(_config(tmp_path, models__policy__prompt_format="chat")), "--verbose"])
    assert code == 2, out
    assert "models.policy" in out and "gemma-3-270m has no chat template" in out and "prompt_format: plain" in out
    assert "starting" not in out  # no engine was started
    assert _prompts_kept(seeded_store)


def test_malformed_messages_row_exits_2_naming_the_line(tmp_path, seeded_store):
    bad = tmp_path / "conv.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    code, out = _run(["run", str(_config(tmp_path, prompts__path=str(bad), prompts__column="messages",
                                         prompts__id_column=None))])
    assert code == 2 and "conv.jsonl, line 2" in out and "end with a user turn" in out
    assert _prompts_kept(seeded_store)


def test_second_writer_gets_a_clear_error(tmp_path):
    cfg = _config(tmp_path)
    holder = Store.open(tmp_path / "store.duckdb")
    try:
        proc = subprocess.run([sys.executable, "-m", "factory.cli", "run", str(cfg)], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
    finally:
        holder.close()
    assert proc.returncode == 1
    assert "store.duckdb" in proc.stderr and f"process {os.getpid()}" in proc.stderr


def test_status_lists_tables_and_runs(tmp_path):
    with Store.open(tmp_path / "s.duckdb") as s:
        run_id = s.start_run("demo", "pipeline", {}, None)
        s.insert("prompts", [{"prompt_id": "a", "text": "t", "run_id": run_id}])
        s.finish_run(run_id, "completed")
    code, out = _run(["status", "--store", str(tmp_path / "s.duckdb")])
    assert code == 0
    assert run_id in out and "completed" in out and "prompts" in out


def test_status_on_missing_store_exits_2(tmp_path):
    code, out = _run(["status", "--store", str(tmp_path / "none.duckdb")])
    assert code == 2 and "none.duckdb" in out


def test_help_has_examples():
    code, out = _run(["run", "--help"])
    assert code == 0 and "factory run pipelines/quickstart.yaml" in out
