"""label: AI feedback. Candidate pairs -> judgments (both orders, k principles) -> comparisons -> pairs.

Reads: this pipeline's responses and revisions. Writes: `judgments` (one row per judge call, with the raw
output, the answer log-probabilities or rubric scores, and the chain-of-thought reasoning), `comparisons`
(both orders of one principle averaged; the disagreement between orders), and `preference_pairs` with
source 'ai_feedback', one row per candidate pair and judge (the judge's model, template, sampling, mode,
constitution and seed are in the pair id, so a second judge never overwrites the first; the ensemble over
principles; chosen = higher averaged probability; ties, identical texts and empty responses stored with
`dropped_reason`). The maths and templates are in factory/judge.py. With `label.guard.enabled` (the default), both
sides of every candidate pair are checked by factory/guard.py first: a pair with a side that addresses the judge is
stored with `dropped_reason = 'addresses_judge'` and, unless `label.guard.judge_flagged`, never judged; the flags go
to `guard_flags` (factory/stages/guard_flags.py).
"""

from __future__ import annotations

import time
from functools import partial

import pyarrow as pa

from factory import judge, templates
from factory.config import PipelineConfig
from factory.constitution import Constitution, sample_principles
from factory.conversation import turns_of
from factory.engines.base import text_tokens
from factory.engines.segments import Segmented
from factory.model_info import answer_cue
from factory.stages.common import BudgetExhausted, Context, Job, StageSpec, encode_all, finish_progress, \
    fit_to_context, job_seed, members, prompt_range, render, stage_lineage, take_pending, write_rows
from factory.stages import guard_flags
from factory.stages.pairs import drop_reason
from factory.store import now, row_id, within


def check_gate(ctx, cfg, constitution, get_engine, info):
    """`factory.calibrate.check_gate` (imported when called: calibrate imports this module)."""
    from factory.calibrate import check_gate as check

    return check(ctx, cfg, constitution, get_engine, info)


# Candidates of one page of the run's prompts: x is the initial response (or the earlier sample), y its revision
# (any round) or a later sample; only the run's own rows, status 'ok'.
SPEC = StageSpec(
    name="label", reads=("prompts", "responses", "revisions"), writes="judgments",
    owns=(("judgments", "TRUE"), ("comparisons", "TRUE"), ("preference_pairs", "t.source = 'ai_feedback'")),
    keys=f"SELECT DISTINCT id, id AS prompt_id FROM ({members('prompts')}) ORDER BY id",
    rows=f"""
WITH resp AS (SELECT r.* FROM responses r SEMI JOIN _chunk c ON c.id = r.prompt_id
              SEMI JOIN ({members('responses')}) m ON m.id = r.response_id
              WHERE r.status = 'ok' AND r.prompt_id BETWEEN $lo AND $hi),
revs AS (SELECT v.* FROM revisions v SEMI JOIN _chunk c ON c.id = v.prompt_id
         SEMI JOIN ({members('revisions')}) m ON m.id = v.revision_id
         WHERE v.status = 'ok' AND v.prompt_id BETWEEN $lo AND $hi),
cands AS (
    SELECT 'revisions' AS source, r.prompt_id, r.response_id AS x_id, r.text AS x_text,
           v.revision_id AS y_id, v.text AS y_text
    FROM revs v JOIN resp r USING (response_id) WHERE $revisions
    UNION ALL
    SELECT 'samples', a.prompt_id, a.response_id, a.text, b.response_id, b.text
    FROM resp a JOIN resp b ON a.prompt_id = b.prompt_id AND a.sample_index < b.sample_index WHERE $samples)
SELECT c.*, p.text AS prompt_text, p.messages FROM cands c JOIN prompts p USING (prompt_id)
WHERE p.prompt_id BETWEEN $lo AND $hi ORDER BY c.prompt_id, c.x_id, c.y_id""")


def _render(mode: str, fmt: str, comparison: str, prompt, a: str, b: str, sp) -> tuple[object, str]:
    """(head, cue): the judge prompt up to its last line (a string, or the user turn in chat format) and the
    last line, the cue the judge continues (the answer cue, "Reasoning:" or "Score A:"). The two are encoded
    apart, so in chat format the cue starts the assistant's reply, and the answer cue's ids are the ones
    `factory.model_info.answer_cue` derived for this tokenizer."""
    head, cue = _render_parts(mode, fmt, comparison, prompt, a, b, sp)
    return head.prompt, cue


def _render_parts(mode: str, fmt: str, comparison: str, prompt, a: str, b: str, sp) -> tuple[Segmented, str]:
    """`_render`, with the head in the pieces of `judge.prompt_parts` (conversation, question, option (A), option
    (B), the mode's lines before the cue), so that a page's judge prompts tokenize each distinct piece once
    (`segments.encode_segments`). `Segmented.prompt` is `_render`'s head, byte for byte."""
    parts = judge.prompt_parts(mode, comparison, prompt, a, b, sp)
    *body, tail = parts
    before, cue = tail.rsplit("\n", 1) if "\n" in tail else ("", tail)  # the last line is the cue
    head = body + ([before + "\n"] if "\n" in tail else [])
    if fmt == "plain":
        return Segmented(tuple(head)), cue
    while head and head[-1].rstrip("\n") == "":  # the user turn's content is the head without its last newlines
        head.pop()
    if head:
        head[-1] = head[-1].rstrip("\n")
    return Segmented(tuple(head), chat=True), cue


def _encode(engine, rendered, cue_ids: list[int]) -> list[int]:
    head, cue = rendered
    tail = cue_ids if cue == judge.ANSWER_CUE else text_tokens(engine.tokenizer, cue)
    return engine.encode(head.prompt if isinstance(head, Segmented) else head) + tail


def _encode_all(engine, rendered: list, cue_ids: list[int]) -> list[list[int]]:
    """`_encode` of a page of judge prompts: the heads in one batch (the engine's `encode_segments` for heads in
    pieces, else `encode_all`), each followed by its cue."""
    heads = [head for head, _ in rendered]
    by_parts = getattr(engine, "encode_segments", None)
    if by_parts is not None and heads and all(isinstance(h, Segmented) for h in heads):
        ids = by_parts(heads)
    else:
        ids = encode_all(engine, [h.prompt if isinstance(h, Segmented) else h for h in heads])
    tails = {cue: cue_ids if cue == judge.ANSWER_CUE else text_tokens(engine.tokenizer, cue) for _, cue in rendered}
    return [h + tails[cue] for h, (_, cue) in zip(ids, rendered)]


def _label_from_logprobs(lp: list[float]) -> dict:
    if all(x == float("-inf") for x in lp):  # e.g. an HTTP judge whose top log-probabilities hold neither
        return {"logprob_a": None, "logprob_b": None, "p_a": None, "status": "failed",
                "reason": "neither answer token is among the log-probabilities the judge returned"}
    return {"logprob_a": lp[0], "logprob_b": lp[1], "p_a": judge.normalise(lp[0], lp[1])}


def _judge_batch(engine, mode: str, cfg: PipelineConfig, ids: list[list[int]], jobs: list[Job], cue, sp):
    """Per job: dict with logprob_a/b, p_a, reasoning, raw_output, status, reason, output tokens."""
    cue_ids, answer_ids = cue
    out = []
    if mode == "logprob":
        for lp in engine.score_next_token(ids, answer_ids):
            out.append({**_label_from_logprobs(lp), "raw_output": "", "output_tokens": 1})
        return out
    if mode == "cot":
        comps = engine.generate(ids, cfg.label.sampling, [j.seed for j in jobs], judge.COT_STOPS)
        before_cue = [judge.cot_answer_cue(c.text.strip(), sp)[:-len(judge.ANSWER_CUE)] for c in comps]
        follow = [p + text_tokens(engine.tokenizer, t) + cue_ids for p, t in zip(ids, before_cue)]
        for c, lp in zip(comps, engine.score_next_token(follow, answer_ids)):
            out.append({**_label_from_logprobs(lp), "raw_output": c.text, "text": c.text.strip(),
                        "output_tokens": c.output_tokens + 1})
        return out
    comps = engine.generate(ids, cfg.label.sampling, [j.seed for j in jobs], ["\n\n"])
    for c in comps:
        p_a, reason = judge.parse_rubric(c.text)
        out.append({"p_a": p_a, "raw_output": c.text, "text": c.text.strip(), "output_tokens": c.output_tokens,
                    **({"status": "failed", "reason": reason} if reason else {})})
    return out


class Judging:
    """The judge over the pages of the label stage: finds each page's pending judgments, encodes only those, asks
    the judge, writes the rows. The engine starts at the first pending judgment; progress goes to `run_progress`."""

    def __init__(self, ctx: Context, cfg: PipelineConfig, lineage: dict, get_engine, info, expected: int):
        self.ctx, self.cfg, self.lineage, self.get_engine, self.info = ctx, cfg, lineage, get_engine, info
        self.expected, self.seen, self.engine, self.prog, self.task = expected, 0, None, None, None
        mode = cfg.label.mode
        # Checked when the pipeline starts (check_judge_answers); derived from the judge's own tokenizer.
        self.cue = answer_cue(info.tokenizer, judge.ANSWER_CUE) if mode != "rubric" else ([], [])

    def _start(self) -> None:
        ctx = self.ctx
        ctx.store.release()  # readers may open the store while the engine starts and while it judges
        self.engine = self.get_engine()
        self.st = ctx.stage_stats("label", self.lineage["model_id"])  # a stage with nothing to do has no stats
        self.base = {"run_id": ctx.run_id, "stage": "label", "engine": self.engine.name, "mode": self.cfg.label.mode,
                     **self.lineage, "max_model_len": self.engine.max_model_len}
        self.prog = ctx.start_progress("label", self.lineage["model_id"], max(self.expected - self.seen, 0),
                                       self.seen)
        if ctx.progress:
            self.task = ctx.progress.add_task("label", total=max(self.expected - self.seen, 0))

    def run(self, jobs: list[Job]) -> None:
        ctx, cfg = self.ctx, self.cfg
        todo, retry = take_pending(ctx, "judgments", jobs, cfg.judge.max_model_len, self.prog)
        self.seen += len(jobs) - len(todo)
        if not todo:
            return
        if self.engine is None:
            self._start()
        render(todo)
        engine, mode, st, step = self.engine, cfg.label.mode, self.st, ctx.write_batch_size
        reserve = cfg.label.sampling.max_tokens + 8 if mode != "logprob" else 1
        for i in range(0, len(todo), step):
            if ctx.max_output_tokens is not None and ctx.tokens_spent() >= ctx.max_output_tokens:
                raise BudgetExhausted(f"output-token budget of {ctx.max_output_tokens} reached during label")
            batch = todo[i:i + step]
            rows, runnable, ids = fit_to_context(engine, batch, reserve, self.base, "judgment_id", st,
                                                 encode=lambda ps: _encode_all(engine, ps, self.cue[0]))
            if runnable:
                t0 = time.perf_counter()
                results = _judge_batch(engine, mode, cfg, ids, runnable, self.cue, self.info.special_tokens)
                st.seconds += time.perf_counter() - t0
                st.model_calls += 1
                for job, tokens, res in zip(runnable, ids, results):
                    status = res.pop("status", "ok")
                    res.setdefault("reason", None)
                    st.failed += status == "failed"
                    st.prompt_tokens += len(tokens)
                    st.output_tokens += res["output_tokens"]
                    p_x = None if res.get("p_a") is None else judge.first_better(res["p_a"], job.fields["answer_order"])
                    rows.append({**self.base, **job.fields, **res, "judgment_id": job.row_id, "p_x": p_x,
                                 "status": status, "prompt_tokens": len(tokens), "seed": job.seed,
                                 "finish_reason": "stop", "created_at": now()})
            st.rows += write_rows(ctx.store, "judgments", rows, retry, progress=self.prog.advance(len(batch)))
            ctx.log(f"label: wrote {len(rows)} judgments ({self.prog.done}/{self.prog.wanted})")
            if self.task is not None:
                ctx.progress.update(self.task, advance=len(batch))


def _fanout(cfg: PipelineConfig) -> int:
    """Judgments per prompt when nothing fails (for the progress estimate)."""
    s = cfg.generate.samples_per_prompt
    cands = (s * cfg.critique.rounds if "revisions" in cfg.label.compare else 0) + \
        (s * (s - 1) // 2 if "samples" in cfg.label.compare else 0)
    return 2 * cfg.label.principles_per_comparison * cands


def judge_lineage(cfg: PipelineConfig, constitution: Constitution, info) -> tuple[dict, dict]:
    """(lineage, judge_id): the lineage columns of the judge's rows, and what identifies the judge behind a label
    (its model key, sampling, template hash, constitution and seed). Shared with the calibration
    (factory/calibrate.py), so a calibration is keyed by exactly what the labels depend on."""
    lc, mcfg = cfg.label, cfg.judge
    lineage = stage_lineage(mcfg, info, lc.sampling, f"label-{lc.mode}")
    # The judge's fixed text is the template rendered around placeholders: a template change changes
    # the hash, and so the comparison ids, instead of mixing old and new judgments.
    skeleton = _render(lc.mode, mcfg.prompt_format, "{question}", "{prompt}", "{a}", "{b}", ())
    lineage["template_hash"] = templates.template_hash(
        mcfg.prompt_format, lc.mode, repr(skeleton[0] + skeleton[1] if mcfg.prompt_format == "plain" else skeleton))
    lineage.update(constitution_id=constitution.id, constitution_version=constitution.version)
    # The judge behind the labels: a second judge (model, template, sampling, constitution or seed) writes its
    # own pair rows next to the first's instead of replacing them.
    judge_id = {"model": info.key, "sampling": lineage["sampling"], "template_hash": lineage["template_hash"],
                "constitution_id": constitution.id, "constitution_version": constitution.version, "seed": cfg.seed}
    return lineage, judge_id


def principles_for(constitution: Constitution, k: int, seed: int, x_id: str, y_id: str, pinned: str | None = None):
    """The principles a comparison of candidates x and y is asked under: `k` sampled per comparison (an ensemble).
    `pinned` (a gold pair's principle, factory/calibrate.py): that principle first, then k - 1 of the others
    sampled, when the constitution has it."""
    sampled = sample_principles(constitution, k, seed, f"label:{x_id}:{y_id}")
    chosen = next((p for p in constitution.principles if p.id == pinned), None) if pinned else None
    if chosen is None:
        return sampled
    return [chosen] + [p for p in sampled if p.id != chosen.id][:k - 1]


def label(ctx: Context, cfg: PipelineConfig, constitution: Constitution, get_engine, info=None) -> dict[str, int]:
    """Judge every candidate pair of the run, page by page, and write comparisons and AI-feedback pairs.
    Returns the AI-feedback pair counts (kept and each drop reason). `info`: the judge's
    factory.model_info.ModelInfo (loaded here when not given)."""
    from factory.model_info import load_model_info

    lc = cfg.label
    info = info or load_model_info(cfg.judge, "judge")
    lineage, judge_id = judge_lineage(cfg, constitution, info)
    # With label.gate, the judge is calibrated on the gold set first (stored calibrations are reused); a judge that
    # fails an enforced gate still judges, but its kept pairs are marked (factory/calibrate.py).
    gate = check_gate(ctx, cfg, constitution, get_engine, info)
    gate_reason = "judge_failed_gate" if gate is not None and gate["failed"] and lc.gate.enforce else None
    if gate_reason:
        # Marked pairs are rows of their own (their id hashes the mark): a later run without the mark writes new rows
        # instead of rewriting these, so a run that adopts this stage's rows (reuse.py) finds them as this run left
        # them. Without a failed gate the ids are what they always were.
        judge_id = {**judge_id, "gate": gate_reason}
    n, pages = SPEC.pages(ctx, revisions="revisions" in lc.compare, samples="samples" in lc.compare)
    judging = Judging(ctx, cfg, lineage, get_engine, info, expected=n * _fanout(cfg))
    counts: dict[str, int] = {"kept": 0}
    for cands in pages:
        flagged = _guard(ctx, lc, cands)  # before the prompt text becomes turns: the guard reads it as text
        for c in cands:
            c["prompt"] = turns_of(c.pop("prompt_text"), c.pop("messages"))
        comparisons = {}
        for c in cands:
            if drop_reason(c["x_text"], c["y_text"]):
                continue  # nothing to judge; counted when pairs are written
            if (c["x_id"] in flagged or c["y_id"] in flagged) and not lc.guard.judge_flagged:
                continue  # addresses the judge: dropped without spending judge calls (counted when pairs are written)
            for pr in principles_for(constitution, lc.principles_per_comparison, cfg.seed, c["x_id"], c["y_id"]):
                cid = row_id("comparison", c["x_id"], c["y_id"], pr.id, lc.mode, info.key, lineage["sampling"],
                             lineage["template_hash"], constitution.id, constitution.version, cfg.seed)
                comparisons[cid] = (c, pr)
        _judge_page(ctx, cfg, comparisons, judging, info)
        span = (cands[0]["prompt_id"], cands[-1]["prompt_id"]) if cands else None  # sorted by prompt id
        write_comparisons(ctx, cfg, {cid: c["source"] for cid, (c, _) in comparisons.items()}, span)
        principles: dict[tuple[str, str], list[str]] = {}
        for c, pr in comparisons.values():
            principles.setdefault((c["x_id"], c["y_id"]), []).append(pr.id)
        page_counts = write_ai_pairs(ctx, cfg, cands, list(comparisons), {k: sorted(v) for k, v in principles.items()},
                                     judge_id, span, flagged=set(flagged), gate_reason=gate_reason)
        for k, v in page_counts.items():
            counts[k] = counts.get(k, 0) + v
    if judging.prog is not None:
        finish_progress(ctx, judging.prog)
    return counts


def _guard(ctx: Context, lc, cands: list[dict]) -> dict:
    """The page's candidate texts that address the judge (factory/guard.py), by row id; their flags are stored in
    `guard_flags`. x is always a response; y a revision (source 'revisions') or a response."""
    if not lc.guard.enabled:
        return {}
    items = [(c["x_id"], "responses", c["x_text"], c["prompt_text"]) for c in cands]
    items += [(c["y_id"], "revisions" if c["source"] == "revisions" else "responses", c["y_text"], c["prompt_text"])
              for c in cands]
    return guard_flags.check(ctx, items)


def _judge_page(ctx: Context, cfg: PipelineConfig, comparisons: dict, judging: Judging, info) -> None:
    """Both orders of every comparison of a page; rubric replies that do not parse are asked again with a new
    seed, up to `rubric_retries` times."""
    lc, fmt = cfg.label, cfg.judge.prompt_format
    attempts = lc.rubric_retries + 1 if lc.mode == "rubric" else 1
    need = {(cid, order) for cid in comparisons for order in ("xy", "yx")}
    for attempt in range(attempts):
        jobs = []
        # In the candidates' order (by prompt, then candidate pair, then principle): the judge prompts of one
        # conversation come together, so a batch holds their shared pieces once (segments.encode_segments).
        for cid, order in [(cid, order) for cid in comparisons for order in ("xy", "yx") if (cid, order) in need]:
            c, pr = comparisons[cid]
            a, b = (c["x_text"], c["y_text"]) if order == "xy" else (c["y_text"], c["x_text"])
            jid = row_id("judgment", cid, order, attempt)
            fields = {"comparison_id": cid, "prompt_id": c["prompt_id"], "candidate_x": c["x_id"],
                      "candidate_y": c["y_id"], "answer_order": order, "attempt": attempt, "principle_id": pr.id}
            rendered = partial(_render_parts, lc.mode, fmt, pr.comparison, c["prompt"], a, b, info.special_tokens)
            jobs.append(Job(jid, rendered, fields, job_seed(cfg.seed + attempt, jid)))
        judging.run(jobs)
        if attempt + 1 == attempts:
            break
        failed = ctx.store.fetch_by_ids("judgments", [j.row_id for j in jobs], where="t.status = 'failed'",
                                        prompts=prompt_range(jobs))
        need = {(r["comparison_id"], r["answer_order"]) for r in failed}
        if not need:
            break


def write_comparisons(ctx: Context, cfg: PipelineConfig, sources: dict[str, str],
                      prompts: tuple[str, str] | None = None) -> None:
    """Both orders of each comparison averaged (clamped for chain-of-thought); needs one ok judgment per order.
    `prompts`: the comparisons' lowest and highest prompt id (`factory.store.within`)."""
    if not sources:
        return
    ctx.store.add_members(ctx.run_id, "comparisons", list(sources))
    lo, hi = cfg.label.cot_clamp
    ctx.store.con.register("_cmp", pa.table({"id": list(sources), "source": list(sources.values())}))
    try:
        ctx.store.run_sql(f"""
            INSERT OR IGNORE INTO comparisons
            WITH ok AS (SELECT j.* FROM {within("judgments", prompts)} j JOIN _cmp w ON j.comparison_id = w.id
                        WHERE j.status = 'ok'),
            paired AS (
                SELECT comparison_id, any_value(prompt_id) AS prompt_id, any_value(candidate_x) AS candidate_x,
                       any_value(candidate_y) AS candidate_y, any_value(principle_id) AS principle_id,
                       any_value(constitution_id) AS constitution_id, any_value(constitution_version) AS constitution_version,
                       any_value(mode) AS mode, any_value(model_id) AS model_id,
                       max(p_x) FILTER (answer_order = 'xy') AS p_x_xy, max(p_x) FILTER (answer_order = 'yx') AS p_x_yx
                FROM ok GROUP BY comparison_id)
            SELECT b.comparison_id, $run, b.prompt_id, b.candidate_x, b.candidate_y, w.source, b.principle_id,
                   b.constitution_id, b.constitution_version, b.mode, b.model_id, b.p_x_xy, b.p_x_yx,
                   CASE WHEN b.mode = 'cot' THEN greatest($lo, least($hi, (b.p_x_xy + b.p_x_yx) / 2))
                        ELSE (b.p_x_xy + b.p_x_yx) / 2 END,
                   abs(b.p_x_xy - b.p_x_yx), (b.p_x_xy - 0.5) * (b.p_x_yx - 0.5) > 0, $now
            FROM paired b JOIN _cmp w ON w.id = b.comparison_id
            WHERE b.p_x_xy IS NOT NULL AND b.p_x_yx IS NOT NULL""",
            {"run": ctx.run_id, "lo": lo, "hi": hi, "now": now()})
    finally:
        ctx.store.con.unregister("_cmp")


def write_ai_pairs(ctx: Context, cfg: PipelineConfig, cands: list[dict], comparison_ids: list[str],
                   principles: dict[tuple[str, str], list[str]], judge_id: dict,
                   prompts: tuple[str, str] | None = None, flagged: set[str] = frozenset(),
                   gate_reason: str | None = None) -> dict[str, int]:
    """The ensemble label of each candidate pair (mean over its principles) -> one preference pair per judge.
    `judge_id`: what identifies the judge (its model key, sampling, template hash, constitution id and version,
    seed); the pair id hashes it with the mode, so two judges of the same candidates give two pair rows.
    `flagged`: candidate ids the guard flagged; their pairs are dropped as 'addresses_judge' (with the label, if
    `label.guard.judge_flagged` had them judged), under an id of their own, so a run with the guard off, whose pair
    of the same candidates is kept, never shares (or rewrites) the row.
    `gate_reason`: the drop reason of every other pair that would be kept ('judge_failed_gate': the judge failed the
    enforced calibration gate; its label is stored all the same)."""
    votes: dict[tuple[str, str], list[float]] = {}
    for r in ctx.store.fetch_by_ids("comparisons", comparison_ids, prompts=prompts):
        votes.setdefault((r["candidate_x"], r["candidate_y"]), []).append(r["p_x"])
    rows, counts = [], {"kept": 0}
    for c in cands:
        key = (c["x_id"], c["y_id"])
        reason = drop_reason(c["x_text"], c["y_text"])
        p_x = None
        if reason is None:
            if key not in votes:
                reason = "not_judged"  # every judgment failed or was skipped; kept in `judgments` with reasons
            else:
                p_x = sum(sorted(votes[key])) / len(votes[key])  # sorted: the same sum whatever order the rows come in
                if judge.is_tie(p_x, cfg.label.tie_threshold):
                    reason = "tie"
        guarded = reason is None or reason in ("not_judged", "tie")
        guarded = guarded and (c["x_id"] in flagged or c["y_id"] in flagged)
        if guarded:
            reason = "addresses_judge"
        reason = reason or gate_reason
        counts[reason or "kept"] = counts.get(reason or "kept", 0) + 1
        x_wins = p_x is not None and p_x > 0.5
        chosen = ((c["x_id"], c["x_text"], c["y_id"], c["y_text"]) if x_wins
                            else (c["y_id"], c["y_text"], c["x_id"], c["x_text"]))
        p_chosen = None if p_x is None else max(p_x, 1 - p_x)
        stage_of = {c["x_id"]: "response", c["y_id"]: "revision" if c["source"] == "revisions" else "response"}
        rows.append({"pair_id": row_id("ai_pair", c["x_id"], c["y_id"], cfg.label.mode, principles.get(key, []),
                                       judge_id, *(("addresses_judge",) if guarded else ())),
                     "run_id": ctx.run_id, "prompt_id": c["prompt_id"], "source": "ai_feedback",
                     "chosen_id": chosen[0], "chosen_stage": stage_of[chosen[0]], "chosen_text": chosen[1],
                     "rejected_id": chosen[2], "rejected_stage": stage_of[chosen[2]], "rejected_text": chosen[3],
                     "principle_id": ",".join(principles.get(key, [])) or None,
                     "constitution_id": judge_id.get("constitution_id"),
                     "constitution_version": judge_id.get("constitution_version"),
                     "label": p_chosen, "margin": None if p_chosen is None else 2 * p_chosen - 1,
                     "dropped_reason": reason, "created_at": now()})
    ctx.store.add_members(ctx.run_id, "preference_pairs", [r["pair_id"] for r in rows])
    # A stored pair is replaced only when its label changed (first stored as not_judged, or judgments skipped as
    # too long were judged since): a re-run with nothing new rewrites nothing and keeps the run that made the row.
    stored = {r["pair_id"]: (r["chosen_id"], r["label"], r["dropped_reason"])
              for r in ctx.store.fetch_by_ids("preference_pairs", [r["pair_id"] for r in rows], prompts=prompts)}
    changed = [r for r in rows if r["pair_id"] in stored
               and stored[r["pair_id"]] != (r["chosen_id"], r["label"], r["dropped_reason"])]
    ctx.store.insert("preference_pairs", [r for r in rows if r["pair_id"] not in stored])
    ctx.store.insert("preference_pairs", changed, replace=True)
    return counts
