"""Judge calibration: the figures on hand-computed examples, the gold file's checks (file and line named), the gate's
verdict, and the shipped gold set's balance."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from factory.calibrate import failures
from factory.calibration import (accuracy, cohen_kappa, expected_calibration_error, length_figures, load_gold,
                                 reliability_plot, report)
from factory.config import ConfigError, GateConfig

ROOT = Path(__file__).resolve().parents[2]


def test_accuracy_counts_labels_above_half():
    assert accuracy([0.9, 0.6, 0.5, 0.2]) == 0.5  # 0.5 is no pick
    assert accuracy([]) is None


def test_cohen_kappa_by_hand():
    # 10 pairs, gold 5 a / 5 b; the judge says a 6 times: agrees on 4 a and 3 b -> p_o = 0.7,
    # p_e = 0.6 * 0.5 + 0.4 * 0.5 = 0.5, kappa = (0.7 - 0.5) / 0.5 = 0.4
    gold = ["a"] * 5 + ["b"] * 5
    judged = ["a", "a", "a", "a", "b", "a", "a", "b", "b", "b"]
    assert cohen_kappa(judged, gold) == pytest.approx(0.4)
    assert cohen_kappa(gold, gold) == pytest.approx(1.0)
    assert cohen_kappa(["b" if g == "a" else "a" for g in gold], gold) == pytest.approx(-1.0)
    # a judge that always says "a": p_o = 0.5, p_e = 1 * 0.5 = 0.5 -> 0, no better than chance
    assert cohen_kappa(["a"] * 10, gold) == pytest.approx(0.0)


def test_ece_by_hand():
    # bin [0.5, 0.55): confidences 0.52, 0.54 (one right) -> |0.5 - 0.53| = 0.03, weight 2/4
    # bin [0.95, 1.0]: confidences 1.0, 0.96 (both right) -> |1 - 0.98| = 0.02, weight 2/4
    ece, rel = expected_calibration_error([0.52, 0.54, 1.0, 0.96], [True, False, True, True])
    assert ece == pytest.approx(0.5 * 0.03 + 0.5 * 0.02)
    assert len(rel) == 10 and [b["n"] for b in rel] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert rel[0]["mean_confidence"] == pytest.approx(0.53) and rel[0]["accuracy"] == 0.5
    assert rel[1]["accuracy"] is None and rel[-1]["bin_hi"] == 1.0
    # perfectly calibrated: confidence 0.75 and right 3 times in 4
    assert expected_calibration_error([0.75] * 4, [True, True, True, False])[0] == pytest.approx(0.0)


def test_length_figures_by_hand():
    # four pairs: longer preferred, longer preferred, longer worse, longer worse; the judge picks the preferred in the
    # first three and the other in the last: the longer wins in pairs 1, 2 and 4 -> 3/4; gold prefers longer 2/4
    labels = [0.8, 0.7, 0.6, 0.3]
    longer = [True, True, False, False]
    f = length_figures(labels, longer)
    assert f["longer_wins_rate"] == 0.75 and f["gold_longer_better_rate"] == 0.5
    assert f["length_bias"] == pytest.approx(0.25)
    assert f["accuracy_when_longer_worse"] == 0.5 and f["accuracy_when_longer_better"] == 1.0
    # equal lengths are left out
    assert length_figures([0.8], [None])["longer_wins_rate"] is None


def _item(kind, preferred, a, b, label, orders):
    return {"kind": kind, "preferred": preferred, "a": a, "b": b, "label": label, "orders": orders}


def test_report_combines_the_figures(tmp_path):
    items = [_item("harmless", "a", "long answer", "no", 0.8, [(0.9, 0.7)]),
             _item("harmless", "b", "long answer", "no", 0.4, [(0.7, 0.5)]),  # P(a) = 0.6: picks a, wrong
             _item("helpful", "b", "x", "longer", 0.7, [(0.2, 0.4)]),
             _item("helpful", "a", "x", "yy", None, [])]  # not judged
    rep = report(items, tie_threshold=0.1)
    assert rep["n"] == 3 and rep["not_judged"] == 1 and rep["n_gold"] == 4
    assert rep["accuracy"] == pytest.approx(2 / 3)
    assert rep["per_kind"] == {"harmless": {"n": 2, "accuracy": 0.5}, "helpful": {"n": 1, "accuracy": 1.0}}
    assert rep["position_consistency"] == pytest.approx(2 / 3)  # (0.7, 0.5): 0.5 is no pick
    assert rep["mean_order_disagreement"] == pytest.approx((0.2 + 0.2 + 0.2) / 3)
    assert rep["ties"] == 1  # |0.4 - 0.5| <= 0.1
    # judge picks a, a, b against gold a, b, b: p_o = 2/3, p_e = 2/3 * 1/3 + 1/3 * 2/3 = 4/9 -> kappa 0.4
    assert rep["kappa"] == pytest.approx((2 / 3 - 4 / 9) / (1 - 4 / 9))
    png = reliability_plot(rep, tmp_path / "rel.png", "test")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _gold_line(**kw):
    row = {"id": "g1", "prompt": "Hi?", "a": "Hello!", "b": "Go away.", "preferred": "a", "kind": "helpful",
           "error": "rude"}
    row.update(kw)
    return json.dumps({k: v for k, v in row.items() if v is not None})


@pytest.mark.parametrize("line, message", [
    ('{"id": "g2", "prompt": "x"', "not valid JSON"),
    (_gold_line(preferred=None), "field 'preferred' is missing"),
    (_gold_line(preferred="c"), "'preferred' must be"),
    (_gold_line(kind="funny"), "'kind' must be one of"),
    (_gold_line(b="Hello!"), "identical"),
    (_gold_line(prompt=None), "exactly one of 'prompt'"),
    (_gold_line(messages=[{"role": "assistant", "content": "hi"}], prompt=None), "'messages'"),
    (_gold_line(extra=1), "unknown field 'extra'"),
    (_gold_line(id="g0"), "duplicate id"),
])
def test_bad_gold_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "gold.jsonl"
    path.write_text(_gold_line(id="g0") + "\n\n" + line + "\n")
    with pytest.raises(ConfigError) as e:
        load_gold(path)
    assert f"{path}, line 3:" in str(e.value) and message in str(e.value)


def test_calibrate_cli_bad_gold_exits_2_before_any_model(tmp_path):
    gold = tmp_path / "gold.jsonl"
    gold.write_text(_gold_line() + "\n" + _gold_line(id="g2", error=None) + "\n")
    # a model path that does not exist: reaching it would be another error; the gold file fails first
    r = subprocess.run([sys.executable, "-m", "factory.cli", "judge", "calibrate", "--gold", str(gold), "--config",
                        str(ROOT / "pipelines" / "quickstart.yaml"), "--set", "models.policy.path=/nonexistent",
                        "--store", str(tmp_path / "s.duckdb")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert f"{gold}, line 2:" in r.stderr and "'error'" in r.stderr
    assert not (tmp_path / "s.duckdb").exists()


def test_gate_failures_name_each_threshold():
    rep = {"accuracy": 0.61, "mean_order_disagreement": 0.2, "length_bias": -0.3}
    assert failures(GateConfig(), rep) == []  # nothing set: nothing checked
    assert failures(GateConfig(min_accuracy=0.75, max_order_disagreement=0.25, max_length_bias=0.2), rep) == [
        "accuracy 0.61 < 0.75", "|length bias| 0.30 > 0.20"]
    assert failures(GateConfig(min_accuracy=0.5), {"accuracy": None}) == ["accuracy not measured (no gold pair judged)"]


def test_shipped_gold_set_is_balanced_and_valid():
    gold = load_gold(ROOT / "data" / "judge_gold.jsonl")
    assert len(gold) >= 120
    kinds = Counter(g["kind"] for g in gold)
    assert kinds["harmless"] >= 50 and kinds["helpful"] >= 50
    pref_a = sum(g["preferred"] == "a" for g in gold) / len(gold)
    better = [g[g["preferred"]] for g in gold]
    worse = [g["b" if g["preferred"] == "a" else "a"] for g in gold]
    longer_better = sum(len(x) > len(y) for x, y in zip(better, worse)) / len(gold)
    assert 0.45 <= pref_a <= 0.55 and 0.4 <= longer_better <= 0.6
    lengths = sorted(len(x) for x in better + worse)
    assert lengths[0] < 20 and lengths[-1] > 250  # several lengths, from one word to a paragraph
    ids = set()
    for name in ("harmless", "helpful_honest"):
        ids |= {p["id"] for p in yaml.safe_load((ROOT / "constitutions" / f"{name}.yaml").read_text())["principles"]}
    assert all(g["principle"] in ids for g in gold)
    assert any(len(g["prompt"]) > 1 for g in gold)  # conversations too


def test_gold_principle_is_pinned_first_and_the_ensemble_keeps_its_size():
    from factory.constitution import load_constitution, sample_principles
    from factory.stages.label import principles_for

    c = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    sampled = [p.id for p in sample_principles(c, 3, 0, "label:gold:g1")]
    assert [p.id for p in principles_for(c, 3, 0, "gold", "g1")] == sampled  # the label stage's sampling
    pinned = next(p.id for p in c.principles if p.id not in sampled)
    got = [p.id for p in principles_for(c, 3, 0, "gold", "g1", pinned)]
    assert got == [pinned] + sampled[:2]
    assert [p.id for p in principles_for(c, 3, 0, "gold", "g1", sampled[1])] == [sampled[1], sampled[0], sampled[2]]
    # a principle of another constitution: the comparison is asked as the label stage would ask it
    assert [p.id for p in principles_for(c, 3, 0, "gold", "g1", "accuracy")] == sampled


def test_plain_words_say_what_the_figures_mean():
    from factory.calibration import plain_words

    weak = {"accuracy": 0.55, "n": 20, "kappa": 0.1, "position_consistency": 0.3, "length_bias": 0.3,
            "longer_wins_rate": 0.8, "gold_longer_better_rate": 0.5}
    text = plain_words(weak)
    assert "55% of 20" in text and "better than chance" in text and "70%" in text
    assert "favours longer" in text and "not data to train on" in text
    good = {**weak, "accuracy": 0.9, "kappa": 0.8, "position_consistency": 0.9, "length_bias": 0.02}
    text = plain_words(good)
    assert "chance" not in text.split("(a coin flip")[1] and "longer" not in text and "trusted" in text
