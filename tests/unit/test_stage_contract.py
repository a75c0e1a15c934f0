"""The stage contract (factory/stages/*: SPEC): each stage declares what it reads, what it writes and its input
pages in one place, and the pipeline's order is consistent with those declarations: a stage reads only tables
the stages before it write (or the prompts), reads its input through the run's membership (the store is the only
hand-off), and its page query takes the page's keys."""

from __future__ import annotations

from factory.stages import critique, generate, label, pairs, revise
from factory.store import DDL, ID_COLUMN

ORDER = [generate.SPEC, critique.SPEC, revise.SPEC, pairs.SPEC, label.SPEC]  # factory/pipeline.py's order


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
