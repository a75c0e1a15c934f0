"""The stage contract (factory/stages/*: SPEC): each stage declares what it reads, what it writes and its input
pages in one place, and the pipeline's order is consistent with those declarations: a stage reads only tables
the stages before it write (or the prompts), reads its input through the run's membership (the store is the only
hand-off), and its page query takes the page's keys."""

from __future__ import annotations

from factory.stages import critique, decontaminate, generate, label, pairs, revise
from factory.store_schema import DDL, ID_COLUMN

ORDER = [generate.SPEC, critique.SPEC, revise.SPEC, pairs.SPEC, label.SPEC,  # factory/pipeline.py's order
         *decontaminate.SPECS.values()]


def test_each_stage_declares_its_tables_and_input_in_one_place():
    schema = " ".join(DDL)
    for spec in ORDER:
        assert spec.writes in ID_COLUMN and f"TABLE IF NOT EXISTS {spec.writes} " in schema
        assert all(f"TABLE IF NOT EXISTS {t} " in schema for t in spec.reads)
        assert "run_rows" in spec.keys and "$run" in spec.keys  # the run's own rows, not every row in the store
        assert "_chunk" in spec.rows and "_chunk" not in spec.keys  # keys once, rows page by page


def test_stages_read_only_what_earlier_stages_write():
    written = {"prompts"}
    for spec in ORDER:
        # critique and revise loop over rounds: from round 2 on they read the revisions of the round before.
        allowed = written | ({"revisions"} if spec.name in ("critique", "revise") else set())
        assert set(spec.reads) <= allowed, (spec.name, set(spec.reads) - allowed)
        written.add(spec.writes)


def test_pages_go_through_the_prompts_in_order_and_read_only_their_range(tmp_path):
    """Every stage's keys are (id, prompt_id) sorted by prompt id, and its page query bounds every table it reads by
    the page's prompt ids ($lo, $hi), so a page's reads skip the rest of each table (`factory.store.within`)."""
    import re

    from factory.store import Store

    with Store.open(tmp_path / "s.duckdb") as store:
        for spec in ORDER:
            params = {"run": "r", "round": 1, "final": 1, "intermediate": False, "revisions": True, "samples": True}
            keys = store.input_keys(spec.keys, params)
            assert keys.column_names == ["id", "prompt_id"], spec.name
            assert re.search(r"ORDER BY (\w+\.)?(prompt_id|id)\b", spec.keys), spec.name
            reads_in_rows = len(re.findall(r"\b(FROM|JOIN)\s+(prompts|responses|critiques|revisions)\b", spec.rows))
            ranges = len(re.findall(r"prompt_id BETWEEN \$lo AND \$hi", spec.rows))
            assert ranges >= reads_in_rows, (spec.name, reads_in_rows, ranges)
