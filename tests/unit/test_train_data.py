"""Training data without contradictions (factory.train.data): pairs over the same two texts from several sources
collapse into one, conflicting ones are settled by the `conflicts` policy, and KTO's unpaired rows never label one
completion both desirable and undesirable; the SFT mix (factory.train.sft) reads the user's data and takes its share."""

from __future__ import annotations

import json

import pytest

from factory.train.data import resolve_conflicts, unpaired_dataset


def pair(pair_id, prompt, chosen, rejected, source, label=1.0):
    return {"pair_id": pair_id, "prompt_id": prompt, "prompt": f"question {prompt}", "messages": None,
            "chosen": chosen, "rejected": rejected, "source": source, "label": label, "margin": abs(2 * label - 1)}


ROWS = [
    # p1: the revision pair says revision > response, the judge the opposite: a conflict
    pair("a1", "p1", "revision 1", "response 1", "final_vs_initial"),
    pair("a2", "p1", "response 1", "revision 1", "ai_feedback", 0.7),
    # p2: three sources agree (one round: round_vs_previous is final_vs_initial again)
    pair("b1", "p2", "revision 2", "response 2", "final_vs_initial"),
    pair("b2", "p2", "revision 2", "response 2", "round_vs_previous"),
    pair("b3", "p2", "revision 2", "response 2", "ai_feedback", 0.8),
    # p3: only a revision pair
    pair("c1", "p3", "revision 3", "response 3", "final_vs_initial"),
    # p4: two revision pairs that disagree and no judge pair
    pair("d1", "p4", "x", "y", "final_vs_initial"),
    pair("d2", "p4", "y", "x", "round_vs_previous"),
]


def directions(rows):
    return {(r["prompt_id"], r["chosen"], r["rejected"]) for r in rows}


@pytest.mark.parametrize("policy, kept", [
    ("judge_wins", ["a2", "b3", "c1"]),
    ("revision_wins", ["a1", "b1", "c1"]),
    ("drop_both", ["b3", "c1"]),
])
def test_conflicts_policy(policy, kept):
    rows, counts = resolve_conflicts(ROWS, policy)
    assert [r["pair_id"] for r in rows] == kept
    # no pair is trained on together with its reverse, and no pair twice
    assert not any((p, b, a) in directions(rows) for p, a, b in directions(rows))
    assert len(directions(rows)) == len(rows)
    assert counts["conflicts"] == 2 and counts["pairs_loaded"] == len(ROWS) and counts["pairs_kept"] == len(kept)
    assert counts["duplicate_pairs"] == 2  # p2's two extra copies
    # every loaded pair is kept, a duplicate, or dropped in a conflict
    assert counts["pairs_kept"] + counts["duplicate_pairs"] + counts["conflict_pairs_dropped"] == len(ROWS)


def test_judge_wins_keeps_the_soft_label_of_agreeing_pairs():
    rows, _ = resolve_conflicts(ROWS, "judge_wins")
    assert {r["pair_id"]: r["label"] for r in rows}["b3"] == 0.8


def test_a_judge_that_disagrees_with_itself_loses_the_conflict():
    rows = [pair("e1", "p5", "u", "v", "final_vs_initial"), pair("e2", "p5", "u", "v", "ai_feedback", 0.6),
            pair("e3", "p5", "v", "u", "ai_feedback", 0.9)]  # e.g. two judges
    kept, counts = resolve_conflicts(rows, "judge_wins")
    assert kept == [] and counts["conflict_pairs_dropped"] == 3


def test_unpaired_rows_never_label_one_completion_both_ways():
    # two rounds: revision 1 beats the response and loses to revision 2; the same pair comes twice
    rows = [pair("f1", "p6", "revision 1", "response", "final_vs_initial"),
            pair("f2", "p6", "revision 2", "revision 1", "round_vs_previous"),
            pair("f3", "p6", "revision 2", "response", "final_vs_initial"),
            pair("f4", "p7", "good", "bad", "ai_feedback", 0.9)]
    for fmt in ("plain", "chat"):
        ds, counts = unpaired_dataset(rows, fmt)
        got = {(r["prompt_id"], str(r["completion"]), r["label"]) for r in ds}
        text = (lambda t: " " + t) if fmt == "plain" else (lambda t: str([{"role": "assistant", "content": t}]))
        assert got == {("p6", text("revision 2"), True), ("p6", text("response"), False),
                       ("p7", text("good"), True), ("p7", text("bad"), False)}
        assert len(ds) == len(got)  # each once
        assert counts == {"unpaired_rows": 8, "ambiguous_completions": 1, "rows_kept": 4}


def test_rates_come_with_a_95_percent_interval():
    from factory.train.evaluate import wilson_interval

    assert wilson_interval(4, 4) == [0.5101, 1.0]  # "win_rate 1" on 4 prompts
    assert wilson_interval(50, 100) == [0.4038, 0.5962]
    assert wilson_interval(0, 10) == [0.0, 0.2775]
    lo, hi = wilson_interval(2.5, 5)  # ties count half
    assert lo < 0.5 < hi and wilson_interval(0, 0) is None


def test_sft_mix_takes_the_users_share_and_reads_both_record_shapes(tmp_path):
    from factory.train.sft import _user_rows, mix

    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(20)] + [{"prompt": "hello", "completion": " there"}]) + "\n")
    user = _user_rows(str(path))
    assert user[0] == {"turns": [{"role": "user", "content": "q0"}], "completion": "a0"}
    assert user[-1] == {"turns": [{"role": "user", "content": "hello"}], "completion": " there"}
    own = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    rows, info = mix(own, user, 0.5, seed=0)
    assert info == {"mix_rows": 10, "mix_rows_available": 21, "mix_share": 0.5} and len(rows) == 20
    assert all(o in rows for o in own)  # every revision is kept
    rows, info = mix(own, user[:3], 0.5, seed=0)  # fewer than the share asks for: all of them
    assert info["mix_rows"] == 3 and len(rows) == 13


def test_sft_mix_dataset_errors_name_the_line(tmp_path):
    from factory.train.sft import _user_rows

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: 'messages' must be a list of turns ending with"):
        _user_rows(str(bad))
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1: expected 'messages', or 'prompt' and 'completion'"):
        _user_rows(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _user_rows(str(tmp_path / "missing.jsonl"))
