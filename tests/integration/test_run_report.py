"""`factory report` and the card's plots on a real labelled run (the session's export store on the tiny model, copied,
with drop reasons other stages write and a response holding markup): the funnel equals counts in the store, every
drop reason is on the page, every <img> is a valid PNG, stored text is escaped; the published folder with its plots
still loads with `datasets` and its card parses; the page renders in a real headless browser."""

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, factory_cmd
from factory.publish import build_folder
from factory.store import Store

pytestmark = pytest.mark.integration

SCRIPT = '<script>alert("pwned")</script>'
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_store(export_store, tmp_path_factory) -> tuple[str, str]:
    """A copy of the labelled run's store (the session's store is shared and read-only), where the guard and the
    gate have had their say on two AI pairs and one kept revision pair's rejected response holds markup."""
    path = str(tmp_path_factory.mktemp("report") / "store.duckdb")
    shutil.copy(export_store, path)
    with Store.open(path) as s:
        run_id = s.resolve_run("latest", kind="pipeline")
        ai = [r[0] for r in s.run_sql("SELECT pair_id FROM preference_pairs WHERE source = 'ai_feedback' "
                                      "ORDER BY pair_id LIMIT 2")]
        assert len(ai) == 2, "the export store's run has AI-feedback pairs"
        for pair_id, reason in zip(ai, ("addresses_judge", "judge_failed_gate")):
            s.run_sql("UPDATE preference_pairs SET dropped_reason = ? WHERE pair_id = ?", [reason, pair_id])
        pair, response = s.run_sql("""SELECT pair_id, rejected_id FROM preference_pairs
                                      WHERE source = 'final_vs_initial' AND dropped_reason IS NULL
                                        AND rejected_stage = 'response' ORDER BY pair_id LIMIT 1""")[0]
        s.run_sql("UPDATE responses SET text = ? WHERE response_id = ?", [SCRIPT, response])
        # the example pair of (final_vs_initial, kept) is the first by pair id: this one
        s.run_sql("UPDATE preference_pairs SET rejected_text = ? WHERE pair_id = ?", [SCRIPT, pair])
    return path, run_id


@pytest.fixture(scope="module")
def report_dir(run_store, tmp_path_factory) -> Path:
    """`factory report --run latest` as a user runs it: a subprocess in a fresh folder, default output folder."""
    store, run_id = run_store
    cwd = tmp_path_factory.mktemp("cwd")
    proc = subprocess.run(factory_cmd("report", "--run", "latest", "--store", store), cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), **_env()})
    assert proc.returncode == 0, proc.stderr
    folder = cwd / "outputs" / "reports" / run_id
    assert f"report: outputs/reports/{run_id}/report.html" in proc.stdout and (folder / "report.html").is_file()
    return folder


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def _cells(page: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first` (escaped as on the page)."""
    m = re.search(r"<tr><td[^>]*>" + re.escape(first) + r"</td>(.*?)</tr>", page)
    assert m, first
    return re.findall(r"<td[^>]*>(.*?)</td>", m.group(1))


def test_funnel_equals_the_store_and_every_drop_reason_is_shown(run_store, report_dir):
    store, run_id = run_store
    page = (report_dir / "report.html").read_text()
    with Store.open(store, read_only=True) as s:
        def members(table, extra=""):
            id_col = {"prompts": "prompt_id", "responses": "response_id", "revisions": "revision_id",
                      "critiques": "critique_id", "judgments": "judgment_id", "comparisons": "comparison_id"}[table]
            return s.run_sql(f"""SELECT count(*) FROM {table} t WHERE t.{id_col} IN (SELECT id FROM run_rows WHERE
                                 run_id = ? AND tbl = '{table}') {extra}""", [run_id])[0][0]
        pairs = s.run_sql("""SELECT source, coalesce(dropped_reason, 'kept'), count(*) FROM preference_pairs
                             WHERE pair_id IN (SELECT id FROM run_rows WHERE run_id = ? AND tbl = 'preference_pairs')
                             GROUP BY ALL""", [run_id])
        expected = {"prompts": [f"{members('prompts')}", ""],
                    "responses ok": [f"{members('responses', 'AND status = ' + chr(39) + 'ok' + chr(39))}",
                                     f"{members('responses')}"],
                    "revisions ok": [f"{members('revisions', 'AND status = ' + chr(39) + 'ok' + chr(39))}",
                                     f"{members('revisions')}"],
                    "comparisons (both orders)": [f"{members('comparisons')}", ""]}
    for step, cells in expected.items():
        assert _cells(page, step) == cells, step
    reasons = {}
    for source, status, n in pairs:
        assert _cells(page, source) and f"<td>{source}</td><td>{status}</td><td class=\"n\">{n}</td>" in page
        if status != "kept":
            reasons[status] = reasons.get(status, 0) + n
    assert {"addresses_judge", "judge_failed_gate"} <= set(reasons)
    for reason, n in reasons.items():
        assert _cells(page, reason) == [str(n)], reason  # the drop-reason table: every reason, its count
    kept_ai = sum(n for src, st, n in pairs if src == "ai_feedback" and st == "kept")
    assert _cells(page, "kept: ai_feedback")[0] == str(kept_ai)


def test_every_image_is_a_valid_png_and_stored_text_is_escaped(report_dir):
    page = (report_dir / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"funnel.png", "labels.png", "principles.png", "bias.png", "stages.png"} <= set(images)
    for name in images:
        w, h = _png(report_dir / name)
        assert w >= 400 and h >= 200, name
    assert SCRIPT not in page and "<script" not in page
    assert html_escaped(SCRIPT) in page  # shown, as text, in the example pairs


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_published_folder_carries_the_plots_and_still_loads(run_store, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    store, run_id = run_store
    folder = tmp_path / "hub"
    result = build_folder(store, "latest", "factory-test/report-demo", folder)
    card = DatasetCard.load(folder / "README.md")
    assert card.data.to_dict()["configs"]
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    assert "figures/funnel.png" in refs and "figures/bias.png" in refs
    for ref in refs:
        assert not ref.startswith(("/", "http")) and _png(folder / ref)[0] >= 400, ref
    assert "addresses_judge" in card.text and "judge_failed_gate" in card.text and "## Run report" in card.text
    ds = load_dataset(str(folder), split="train")  # the default config (preference), the plots beside it
    assert ds.num_rows == result["rows"]["preference"]["train"] > 0


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")
def test_page_renders_in_a_headless_browser(report_dir, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           "--window-size=1280,3000", (report_dir / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    im = Image.open(shot).convert("L")
    assert im.size == (1280, 3000)
    # rendered, not blank: the plots put thousands of dark and mid-grey pixels on the white page
    hist = im.histogram()
    assert sum(hist[:200]) > 50_000, "the page rendered (almost) blank"
