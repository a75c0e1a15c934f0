"""The store's schema: its tables (`DDL`), the lineage columns every model-written row carries (`GEN_COLUMNS`), the
columns added since the first stores were written (`ADDED_COLUMNS`, added on open by `Store.migrate`), the schema
version, the tables of generated rows (`TABLES`) and each table's id column (`ID_COLUMN`).
"""

SCHEMA_VERSION = 1

GEN_COLUMNS = """
    run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL, model_id VARCHAR, engine VARCHAR, sampling JSON,
    seed BIGINT, template_hash VARCHAR, constitution_id VARCHAR, constitution_version VARCHAR,
    principle_id VARCHAR, prompt_tokens INTEGER, output_tokens INTEGER, finish_reason VARCHAR,
    raw_output VARCHAR, text VARCHAR, status VARCHAR NOT NULL, reason VARCHAR, created_at TIMESTAMP,
    model_fingerprint VARCHAR, reasoning VARCHAR, max_model_len INTEGER
"""
# Columns added after the first stores were written: (table(s), column definition), added on open.
ADDED_COLUMNS = [(("responses", "critiques", "revisions", "judgments"), "model_fingerprint VARCHAR"),
                 (("responses", "critiques", "revisions", "judgments"), "reasoning VARCHAR"),
                 (("prompts",), "messages JSON"),
                 (("runs",), "scope_hash VARCHAR"),
                 # The context length a row was written under: a 'skipped' row (prompt too long) is pending
                 # again once a run's max_model_len is larger (see `pending_ids`).
                 (("responses", "critiques", "revisions", "judgments"), "max_model_len INTEGER"),
                 # the run's process, so `status` can tell a live run from a killed one (factory/lifetime.py)
                 (("runs",), "pid INTEGER"), (("runs",), "hostname VARCHAR"), (("runs",), "process_started DOUBLE"),
                 # why a text was flagged: 'ngram' or 'short_item' (factory/decontam.py)
                 (("contamination",), "kind VARCHAR")]

DDL = [
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, config_path VARCHAR, config JSON,
        config_hash VARCHAR, scope_hash VARCHAR, status VARCHAR, message VARCHAR, factory_version VARCHAR,
        stats JSON, started_at TIMESTAMP, finished_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS prompts (
        prompt_id VARCHAR PRIMARY KEY, text VARCHAR NOT NULL, source VARCHAR, source_id VARCHAR,
        meta JSON, run_id VARCHAR, created_at TIMESTAMP, messages JSON)""",
    f"""CREATE TABLE IF NOT EXISTS responses (
        response_id VARCHAR PRIMARY KEY, prompt_id VARCHAR NOT NULL, sample_index INTEGER, {GEN_COLUMNS})""",
    f"""CREATE TABLE IF NOT EXISTS critiques (
        critique_id VARCHAR PRIMARY KEY, prompt_id VARCHAR NOT NULL, response_id VARCHAR NOT NULL,
        parent_id VARCHAR NOT NULL, round INTEGER NOT NULL, {GEN_COLUMNS})""",
    f"""CREATE TABLE IF NOT EXISTS revisions (
        revision_id VARCHAR PRIMARY KEY, prompt_id VARCHAR NOT NULL, response_id VARCHAR NOT NULL,
        parent_id VARCHAR NOT NULL, critique_id VARCHAR NOT NULL, round INTEGER NOT NULL, {GEN_COLUMNS})""",
    """CREATE TABLE IF NOT EXISTS preference_pairs (
        pair_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL, prompt_id VARCHAR NOT NULL, source VARCHAR,
        chosen_id VARCHAR, chosen_stage VARCHAR, chosen_text VARCHAR,
        rejected_id VARCHAR, rejected_stage VARCHAR, rejected_text VARCHAR,
        round INTEGER, principle_id VARCHAR, constitution_id VARCHAR, constitution_version VARCHAR,
        label DOUBLE, margin DOUBLE, dropped_reason VARCHAR, created_at TIMESTAMP)""",
    # One judge call: a comparison of candidates x and y under one principle, in one order ("xy": x is (A)).
    f"""CREATE TABLE IF NOT EXISTS judgments (
        judgment_id VARCHAR PRIMARY KEY, comparison_id VARCHAR NOT NULL, prompt_id VARCHAR NOT NULL,
        candidate_x VARCHAR NOT NULL, candidate_y VARCHAR NOT NULL, answer_order VARCHAR NOT NULL,
        mode VARCHAR NOT NULL, attempt INTEGER NOT NULL, logprob_a DOUBLE, logprob_b DOUBLE, p_a DOUBLE,
        p_x DOUBLE, {GEN_COLUMNS})""",
    # Both orders of one comparison, averaged: p_x is P(x is better); the label of the comparison.
    """CREATE TABLE IF NOT EXISTS comparisons (
        comparison_id VARCHAR PRIMARY KEY, run_id VARCHAR, prompt_id VARCHAR, candidate_x VARCHAR,
        candidate_y VARCHAR, source VARCHAR, principle_id VARCHAR, constitution_id VARCHAR,
        constitution_version VARCHAR, mode VARCHAR, model_id VARCHAR, p_x_xy DOUBLE, p_x_yx DOUBLE,
        p_x DOUBLE, disagreement DOUBLE, consistent BOOLEAN, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS judge_reports (
        run_id VARCHAR PRIMARY KEY, report JSON, created_at TIMESTAMP)""",
    # Per-stage progress of a run, written with each batch it commits: rows wanted (pending when the stage
    # started), rows done since, wall seconds since the stage started. `factory status` derives rows/s and an ETA.
    """CREATE TABLE IF NOT EXISTS run_progress (
        run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL, model_id VARCHAR, wanted BIGINT, stored_before BIGINT,
        done BIGINT, seconds DOUBLE, started_at TIMESTAMP, updated_at TIMESTAMP, PRIMARY KEY (run_id, stage))""",
    # Run membership: every row a run wanted, whether it wrote it or found it stored (written by an earlier run,
    # perhaps with another config). Stages hand off through it (a stage's input is the run's rows of the table
    # before it), and `export --run X` / `publish --run X` contain exactly run X's rows. No primary key: written
    # once per chunk a stage reads, in id order; duplicates (a stage read twice) are harmless to semi-joins.
    "CREATE TABLE IF NOT EXISTS run_rows (run_id VARCHAR NOT NULL, tbl VARCHAR NOT NULL, id VARCHAR NOT NULL)",
    # Stages finished, by definition and inputs' fingerprint: a re-run adopts their rows (factory/stages/reuse.py).
    """CREATE TABLE IF NOT EXISTS stage_runs (stage VARCHAR NOT NULL, definition VARCHAR NOT NULL,
        inputs VARCHAR NOT NULL, run_id VARCHAR NOT NULL, created_at TIMESTAMP, PRIMARY KEY (stage, definition, inputs))""",
    # The guard's flags (factory/guard.py): a response or revision that addresses the judge, the pattern group that
    # matched and the matched text. One row per text (its first match); written by the label and pairs stages.
    """CREATE TABLE IF NOT EXISTS guard_flags (row_id VARCHAR NOT NULL, tbl VARCHAR NOT NULL, pattern VARCHAR,
        span VARCHAR, run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (row_id, tbl))""",
    # Judge calibrations on a gold set (factory/calibration.py): model_id is the judge as comparisons.model_id shows
    # it, settings_hash what else the labels depend on (fingerprint, mode, template, sampling, constitution, ensemble).
    """CREATE TABLE IF NOT EXISTS judge_calibrations (calibration_id VARCHAR PRIMARY KEY, model_id VARCHAR,
        gold_path VARCHAR, gold_sha256 VARCHAR, settings_hash VARCHAR, report JSON, created_at TIMESTAMP)""",
    # Benchmark overlap (factory/stages/decontaminate.py): one row per (text, benchmark) flagged by a run; `kind` is
    # 'ngram' (they share a word n-gram) or 'short_item' (the text contains a benchmark item shorter than an n-gram
    # whole; NULL in rows written before short items were checked), `ngram` one shared n-gram or that item (the
    # reason), `hits` how many distinct ones. A pair whose prompt, chosen or rejected text has a row here is left out
    # of export and training (the pair row itself is kept as it is).
    """CREATE TABLE IF NOT EXISTS contamination (row_id VARCHAR NOT NULL, tbl VARCHAR NOT NULL, benchmark VARCHAR NOT NULL,
        ngram VARCHAR, hits INTEGER, run_id VARCHAR NOT NULL, created_at TIMESTAMP, kind VARCHAR,
        PRIMARY KEY (run_id, tbl, row_id, benchmark))""",
]

TABLES = ("prompts", "responses", "critiques", "revisions", "preference_pairs", "judgments", "comparisons")
ID_COLUMN = {"prompts": "prompt_id", "responses": "response_id", "critiques": "critique_id",
             "revisions": "revision_id", "preference_pairs": "pair_id", "runs": "run_id",
             "judgments": "judgment_id", "comparisons": "comparison_id", "judge_reports": "run_id",
             "judge_calibrations": "calibration_id",
             "contamination": "row_id"}
