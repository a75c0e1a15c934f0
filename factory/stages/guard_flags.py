"""The guard inside the stages: check a page's texts with factory/guard.py and store the flags.

Reads nothing. Writes `guard_flags` (one row per flagged response or revision: the pattern group and the matched
span, with the run that found it; a text flagged before keeps its first row). Used by the label stage (both sides of
every candidate pair) and the pairs stage (the chosen revision)."""

from __future__ import annotations

from factory import guard
from factory.store import now


def check(ctx, items) -> dict[str, guard.Flag]:
    """`items`: (row id, table 'responses' or 'revisions', text, the prompt's text) of one page. Returns the flagged
    ones by row id. Each distinct row is checked once, each prompt's lettered options once."""
    letters: dict[str, bool] = {}
    flags: dict[str, guard.Flag] = {}
    rows, seen = [], set()
    for rid, tbl, text, prompt in items:
        if rid in seen:
            continue
        seen.add(rid)
        key = prompt or ""
        if key not in letters:
            letters[key] = not guard.offers_options(prompt)
        flag = guard.detect(text, letters=letters[key])
        if flag is not None:
            flags[rid] = flag
            rows.append({"row_id": rid, "tbl": tbl, "pattern": flag.pattern, "span": flag.span,
                         "run_id": ctx.run_id, "created_at": now()})
    if rows:
        ctx.store.insert("guard_flags", rows)
        ctx.log(f"guard: {len(rows)} of {len(seen)} texts address the judge (guard_flags)")
    return flags
