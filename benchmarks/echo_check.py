"""Per-row time of the echo check (factory.stages.common._echoes) against the difflib.SequenceMatcher check it
replaced (issue 11, item 3), on N synthetic rows shaped like the stage's: a request of ~20 words and an output of
~80 words (an echo: ~20). Row kinds (seeded): 70% genuine answers (words drawn from the same vocabulary, so they share words with
the request), 10% genuine answers that quote the whole request first, 10% the request with one word changed,
10% the request with a few words added. Both checks run on the same rows in this process; the script prints
microseconds per row, the ratio, and where the two checks disagree (counted per row kind).

Run from the repository root:
    .venv/bin/python benchmarks/echo_check.py [--rows 10000 --seed 0]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from difflib import SequenceMatcher

from factory.stages.common import _echoes


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?\"'")


def sequence_matcher_echoes(text: str, request: str) -> bool:
    """The check before issue 11 (quadratic-ish in the text length)."""
    a, b = _norm(text), _norm(request)
    return SequenceMatcher(None, a, b).ratio() >= 0.9 or (a.split()[:5] == b.split()[:5] and len(a) <= 1.3 * len(b))


def rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "da", "pe", "fo", "gu"]
    vocab = list(dict.fromkeys("".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)))
    common = vocab[:60]  # function words: frequent in requests and answers alike

    def words(k: int) -> list[str]:
        ws = [rng.choice(common) if rng.random() < 0.4 else rng.choice(vocab) for _ in range(k)]
        return [w + "," if rng.random() < 0.08 else w for w in ws]

    out = []
    for i in range(n):
        req = words(rng.randint(16, 24))
        request = " ".join(req).capitalize() + "?"
        kind = rng.random()
        if kind < 0.7:
            kind, text = "answer", " ".join(words(rng.randint(70, 90))).capitalize() + "."
        elif kind < 0.8:
            kind, text = "quotes_request", request + " " + " ".join(words(rng.randint(55, 65))) + "."
        elif kind < 0.9:
            changed = list(req)
            changed[rng.randrange(len(changed))] = rng.choice(vocab)
            kind, text = "one_word_changed", " ".join(changed).capitalize() + "?"
        else:
            kind, text = "request_plus_words", request + " " + " ".join(words(rng.randint(1, 3))) + "."
        out.append((kind, text, request))
    return out


def per_row_us(check, data, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _, text, request in data:
            check(text, request)
        best = min(best, time.perf_counter() - t0)
    return best / len(data) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per check; the best is reported")
    args = ap.parse_args()
    data = rows(args.rows, args.seed)
    words_req = sum(len(r.split()) for _, _, r in data) / len(data)
    words_text = sum(len(t.split()) for _, t, _ in data) / len(data)
    old = per_row_us(sequence_matcher_echoes, data, args.repeats)
    new = per_row_us(_echoes, data, args.repeats)
    print(f"{len(data)} rows (request {words_req:.1f} words, output {words_text:.1f} words on average)")
    print(f"SequenceMatcher check: {old:8.2f} us/row   ({old * len(data) / 1e6:.3f} s for all rows)")
    print(f"word-multiset check:   {new:8.2f} us/row   ({new * len(data) / 1e6:.3f} s for all rows)")
    print(f"speed-up: {old / new:.1f}x")
    by_kind, flagged_old, flagged_new = Counter(), Counter(), Counter()
    for kind, text, request in data:
        by_kind[kind] += 1
        flagged_old[kind] += sequence_matcher_echoes(text, request)
        flagged_new[kind] += _echoes(text, request)
    print("flagged as echoes per row kind (old / new / rows):")
    for kind in sorted(by_kind):
        print(f"  {kind:20s} {flagged_old[kind]:6d} / {flagged_new[kind]:6d} / {by_kind[kind]:6d}")


if __name__ == "__main__":
    main()
