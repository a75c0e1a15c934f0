"""`factory publish` without --local-dir, end to end: the real CLI in a subprocess uploads a real store's run
to a local Hub stand-in (tests/hub_standin.py, its own process), through huggingface_hub's real upload path;
the data is then downloaded back with huggingface_hub and loaded with `datasets`. No network."""

import base64
import json
import os
import re
import select
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from datasets import load_dataset
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

pytestmark = pytest.mark.integration

TOKEN = "hf_FAKEstandinTOKEN0123456789abcdefSECRET"
REPO = "factory-test/cai-demo"
OURS = {"README.md", "constitution.yaml", "provenance.json"}


def card_images(files: dict) -> set[str]:
    """The plots the card shows (`![title](figures/x.png)`), each a PNG that was uploaded."""
    images = set(re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", files["README.md"].decode()))
    assert images and all(files[i].startswith(b"\x89PNG") for i in images), images
    return images


@dataclass
class Hub:
    url: str
    root: Path

    @property
    def repo(self) -> Path:
        return self.root / "datasets" / REPO

    def files(self) -> dict[str, bytes]:
        return {p.relative_to(self.repo).as_posix(): p.read_bytes() for p in self.repo.rglob("*") if p.is_file()}

    def log(self) -> dict:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.url}/_standin/log", timeout=10) as r:
            return json.loads(r.read())

    def api(self) -> HfApi:
        return HfApi(endpoint=self.url, token=TOKEN)


@pytest.fixture
def hub(tmp_path):
    """The stand-in on 127.0.0.1 (a free port it picks and prints), accepting only TOKEN; killed at teardown."""
    root = tmp_path / "hub"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_standin.py"), "--root", str(root),
                             "--port", "0", "--token", TOKEN], stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 30)[0], "the Hub stand-in did not start"
        line = proc.stdout.readline()
        assert line.startswith("ready "), line
        yield Hub(line.split()[1], root)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def publish(hub: Hub, store: str, tmp_path: Path, *args: str, token: str = TOKEN, xet: bool = True):
    """`factory publish` as a user runs it, with the token in the environment only and every cache in tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_CACHE=str(tmp_path / "hf-home" / "hub"), HF_DATASETS_CACHE=str(tmp_path / "hf-home" / "ds"),
               HF_HUB_DISABLE_TELEMETRY="1", TMPDIR=str(tmp_path / "tmp"), NO_PROXY="127.0.0.1", COLUMNS="200")
    if not xet:  # huggingface_hub's single-commit path, taken when hf_xet is not installed
        env["HF_HUB_DISABLE_XET"] = "1"
    for d in ("tmp", "cwd"):
        (tmp_path / d).mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "factory.cli", "publish", "--store", store, "--repo-id", REPO,
                           *args], cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=300, check=False)
    assert token not in proc.stdout + proc.stderr
    return proc


def reported_rows(stdout: str) -> dict[tuple[str, str], int]:
    rows = {(fmt, split): int(n) for fmt, split, n in re.findall(r"rows (\w+)/(\w+)\W+(\d+)", stdout)}
    assert ("preference", "train") in rows, stdout
    return rows


def card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def assert_token_written_nowhere(*paths: Path):
    for root in paths:
        for p in [root] if root.is_file() else root.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert TOKEN.encode() not in data and base64.b64encode(TOKEN.encode()) not in data, p


def test_publish_uploads_a_dataset_that_loads_back(hub, export_store, tmp_path):
    proc = publish(hub, export_store, tmp_path, "--private")
    assert proc.returncode == 0, proc.stderr
    rows = reported_rows(proc.stdout)
    assert f"{hub.url}/datasets/{REPO}" in proc.stdout

    files = hub.files()
    data = {f"data/{fmt}/{split}-00000-of-00001.parquet" for fmt, split in rows}
    assert set(files) == OURS | data | card_images(files) | {".gitattributes"}
    prov = json.loads(files["provenance.json"])
    assert set(prov["files"]) == data and prov["constitution"]["id"] == "harmless"
    log = hub.log()
    assert log["created"] == [{"repo_id": REPO, "type": "dataset", "visibility": "private"}]
    assert [c["summary"] for c in log["commits"]] == [f"factory: publish run {prov['run_id']}"]
    assert set(log["tokens"]) == {TOKEN}  # the stand-in refuses writes with any other token
    assert not [p for _, p in log["requests"] if "xet" in p or "lfs" in p]  # regular uploads only, nothing else

    # what a user of the dataset does: download it from the "Hub" and load every config and split
    with pytest.raises(RepositoryNotFoundError):  # private: not readable without the token
        HfApi(endpoint=hub.url, token=False).repo_info(REPO, repo_type="dataset")
    local = snapshot_download(REPO, repo_type="dataset", endpoint=hub.url, token=TOKEN,
                              local_dir=tmp_path / "download", cache_dir=tmp_path / "hf-home" / "hub")
    for (fmt, split), n in rows.items():
        assert load_dataset(local, fmt, split=split).num_rows == n > 0
    assert {c["config_name"] for c in card_meta(files["README.md"].decode())["configs"]} == {f for f, _ in rows}

    assert not list((tmp_path / "tmp").iterdir()), "the staging folder was left behind"
    assert not list((tmp_path / "cwd").iterdir()), "publish wrote into the working directory"
    assert_token_written_nowhere(hub.root, tmp_path, Path(export_store))


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "single-commit"])
def test_republish_keeps_card_edits_deletes_stale_data_and_is_idempotent(hub, export_store, tmp_path, xet):
    proc = publish(hub, export_store, tmp_path, xet=xet)
    assert proc.returncode == 0, proc.stderr
    rows = reported_rows(proc.stdout)
    assert hub.log()["created"] == [{"repo_id": REPO, "type": "dataset", "visibility": None}]  # Hub default

    # the user edits the card on the Hub and adds a file; a data file an earlier publish wrote is now stale
    readme = hub.files()["README.md"].decode()
    meta = card_meta(readme)
    meta["annotations_creators"] = ["machine-generated"]
    edited = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + readme.split("\n---\n", 1)[1]
    parquet = hub.files()["data/preference/train-00000-of-00001.parquet"]
    stale = ["data/preference/validation-00000-of-00001.parquet", "data/old_config/train-00000-of-00001.parquet"]
    hub.api().create_commit(REPO, repo_type="dataset", commit_message="edit the card", operations=[
        CommitOperationAdd("README.md", edited.encode()), CommitOperationAdd("NOTES.md", b"the user's file\n"),
        *[CommitOperationAdd(path, parquet) for path in stale]])

    proc = publish(hub, export_store, tmp_path, xet=xet)
    assert proc.returncode == 0, proc.stderr
    files = hub.files()
    data = {f"data/{fmt}/{split}-00000-of-00001.parquet" for fmt, split in reported_rows(proc.stdout)}
    # stale data deleted, the user's file kept, the card's plots there
    assert set(files) == OURS | data | card_images(files) | {".gitattributes", "NOTES.md"}
    meta = card_meta(files["README.md"].decode())
    assert meta["annotations_creators"] == ["machine-generated"] and meta["configs"]
    last = hub.log()["commits"][-1]["operations"]
    assert sorted(p for op, p in last if op == "deletedFile") == sorted(stale)
    assert ["file", "NOTES.md"] not in last

    commits = len(hub.log()["commits"])
    proc = publish(hub, export_store, tmp_path, xet=xet)
    assert proc.returncode == 0, proc.stderr
    assert reported_rows(proc.stdout) == rows
    assert hub.files() == files
    assert len(hub.log()["commits"]) == commits  # nothing was sent again: unchanged files are skipped
    assert_token_written_nowhere(hub.root, tmp_path, Path(export_store))


def test_refused_publishes_leave_the_hub_as_it_was(hub, export_store, tmp_path):
    proc = publish(hub, export_store, tmp_path, "--run", "no-such-run")
    assert proc.returncode == 2 and "no-such-run" in proc.stderr
    assert hub.log()["requests"] == [["GET", "/_standin/log"]]  # a bad run is caught before the Hub is called

    proc = publish(hub, export_store, tmp_path, token="hf_someoneElsesToken")
    assert proc.returncode == 1 and "401" in proc.stderr and "Traceback" not in proc.stderr
    assert not hub.repo.exists()

    hub.api().create_repo(REPO, repo_type="dataset")  # public
    proc = publish(hub, export_store, tmp_path, "--private")
    assert proc.returncode == 2 and "public" in proc.stderr and "--private" in proc.stderr
    assert set(hub.files()) == {".gitattributes"} and not hub.log()["commits"]
