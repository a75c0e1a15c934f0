"""Unit tests for factory.constitution: validation messages and deterministic principle sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from factory.config import ConfigError
from factory.constitution import Constitution, load_constitution, sample_principles


def _principle(pid: str, **over) -> dict:
    p = {"id": pid, "critique_request": f"Critique for {pid}.", "revision_request": f"Revise for {pid}.",
         "comparison": f"Compare for {pid}?"}
    p.update(over)
    return p


def _example(principle: str) -> dict:
    return {"principle": principle, "prompt": "p", "response": "r", "critique": "c", "revision": "v"}


def _write(tmp_path: Path, data: dict, name: str = "const.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _const(principles: list[dict], examples: list[dict] | None = None) -> dict:
    return {"id": "test", "version": "1", "principles": principles, "examples": examples or []}


def _make(n: int) -> Constitution:
    return Constitution.model_validate(_const([_principle(f"p{i}") for i in range(n)]))


# ---- validation ------------------------------------------------------------------------------------

def test_valid_constitution_loads(tmp_path):
    path = _write(tmp_path, _const([_principle("a"), _principle("b")], [_example("b")]))
    c = load_constitution(path)
    assert [p.id for p in c.principles] == ["a", "b"]
    assert c.principle("b").revision_request == "Revise for b."
    assert c.examples[0].principle == "b"


def test_numeric_version_is_accepted_as_string(tmp_path):
    data = _const([_principle("a")])
    data["version"] = 2
    c = load_constitution(_write(tmp_path, data))
    assert c.version == "2"


def test_duplicate_principle_id_names_file_and_id(tmp_path):
    path = _write(tmp_path, _const([_principle("same-id"), _principle("other"), _principle("same-id")]))
    with pytest.raises(ConfigError) as ei:
        load_constitution(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "'same-id'" in msg
    assert "twice" in msg
    assert "invalid constitution" in msg


def test_empty_critique_request_names_principle_by_id(tmp_path):
    path = _write(tmp_path, _const([_principle("fine"), _principle("broken-one", critique_request="   ")]))
    with pytest.raises(ConfigError) as ei:
        load_constitution(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "'broken-one'" in msg
    assert "critique_request" in msg
    assert "non-empty" in msg
    # The principle that is fine is not blamed.
    assert "'fine'" not in msg


def test_duplicate_id_message_does_not_dump_the_whole_file(tmp_path):
    # A realistic constitution (20 principles with long texts) with one duplicated id: the error should
    # name the id, not echo every principle back at the user.
    root = Path(__file__).parents[2]
    data = yaml.safe_load((root / "constitutions" / "harmless.yaml").read_text())
    data["principles"].append(dict(data["principles"][0]))
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as ei:
        load_constitution(path)
    msg = str(ei.value)
    assert repr(data["principles"][0]["id"]) in msg
    assert data["principles"][5]["revision_request"] not in msg, "the whole constitution is dumped into the error"


def test_example_with_unknown_principle_is_an_error(tmp_path):
    path = _write(tmp_path, _const([_principle("a")], [_example("a"), _example("ghost")]))
    with pytest.raises(ConfigError) as ei:
        load_constitution(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "examples[1]" in msg
    assert "'ghost'" in msg


def test_missing_field_names_field_and_principle(tmp_path):
    p = _principle("no-comparison")
    del p["comparison"]
    path = _write(tmp_path, _const([_principle("a"), p]))
    with pytest.raises(ConfigError) as ei:
        load_constitution(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "comparison" in msg
    assert "'no-comparison'" in msg
    assert "Field required" in msg


def test_missing_top_level_field_is_an_error(tmp_path):
    data = _const([_principle("a")])
    del data["version"]
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match="version"):
        load_constitution(path)


def test_unknown_key_in_principle_is_an_error(tmp_path):
    path = _write(tmp_path, _const([_principle("a", critique="typo key")]))
    with pytest.raises(ConfigError, match="unknown key"):
        load_constitution(path)


@pytest.mark.parametrize("where", ["principles", "examples", "top"])
def test_unknown_key_lists_the_keys_allowed_there(tmp_path, where):
    """A misspelt key inside a list item (principles[i], examples[i]) or at the top level lists the keys that
    section allows; the message never ends in an empty "allowed here:"."""
    data = _const([_principle("a", critique="typo key")] if where == "principles" else [_principle("a")],
                  [{**_example("a"), "answer": "x"}] if where == "examples" else None)
    if where == "top":
        data["principle"] = "typo"
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as ei:
        load_constitution(path)
    line = next(ln for ln in str(ei.value).splitlines() if "unknown key" in ln)
    assert not line.rstrip().endswith(":"), line
    model = {"principles": "Principle", "examples": "Example", "top": "Constitution"}[where]
    from factory import constitution

    allowed = line.split("allowed here:", 1)[1]
    assert [k.strip() for k in allowed.split(",")] == list(getattr(constitution, model).model_fields), line
    if where == "principles":
        assert "principles.0 (id 'a').critique" in line


def test_no_principles_is_an_error(tmp_path):
    path = _write(tmp_path, _const([]))
    with pytest.raises(ConfigError, match="principles"):
        load_constitution(path)


# ---- sample_principles -----------------------------------------------------------------------------

def test_sample_principles_is_deterministic():
    c = _make(10)
    a = [p.id for p in sample_principles(c, 3, seed=7, key="resp-1:1")]
    b = [p.id for p in sample_principles(_make(10), 3, seed=7, key="resp-1:1")]
    assert a == b


def test_sample_principles_returns_k_distinct():
    c = _make(10)
    for k in range(1, 11):
        got = sample_principles(c, k, seed=0, key=f"k{k}")
        ids = [p.id for p in got]
        assert len(ids) == k
        assert len(set(ids)) == k
        assert set(ids) <= {p.id for p in c.principles}


def test_sample_principles_differs_across_keys():
    c = _make(10)
    picks = {tuple(p.id for p in sample_principles(c, 2, seed=0, key=f"resp-{i}:1")) for i in range(50)}
    # 90 ordered pairs are possible; 50 keys must not all map to one choice.
    assert len(picks) > 5


def test_sample_principles_differs_across_seeds():
    c = _make(10)
    picks = {tuple(p.id for p in sample_principles(c, 2, seed=s, key="same-key")) for s in range(50)}
    assert len(picks) > 5


def test_sample_principles_covers_all_principles_over_many_keys():
    c = _make(6)
    seen = {sample_principles(c, 1, seed=3, key=str(i))[0].id for i in range(200)}
    assert seen == {p.id for p in c.principles}


def test_sample_principles_caps_k_at_number_of_principles():
    c = _make(4)
    got = sample_principles(c, 10, seed=0, key="x")
    assert sorted(p.id for p in got) == sorted(p.id for p in c.principles)
