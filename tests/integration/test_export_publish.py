"""Export to TRL's formats and publish a Hub dataset folder, from a real store made on the tiny model.
The exports are real client input: `datasets` loads them and TRL trainers take a step on them as is."""

import json
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset, load_from_disk

from conftest import NEAR_A, NEAR_B
from factory.export import FORMATS, ExportFilter, build_export, write_export
from factory.publish import build_folder
from factory.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store_path(export_store):  # built once per session in conftest, shared with test_hub_upload.py
    return export_store


@pytest.mark.parametrize("file_format", ["parquet", "jsonl", "datasets"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_with_datasets(store_path, tmp_path, fmt, file_format):
    with Store.open(store_path, read_only=True) as s:
        dd, stats = build_export(s, fmt, ExportFilter(runs=["latest"], test_fraction=0.3))
    write_export(dd, str(tmp_path / "out"), file_format)
    if file_format == "datasets":
        loaded = load_from_disk(str(tmp_path / "out"))
    else:
        ext = "parquet" if file_format == "parquet" else "json"
        files = {s: str(tmp_path / "out" / f"{s}.{'parquet' if ext == 'parquet' else 'jsonl'}") for s in dd}
        loaded = load_dataset(ext, data_files=files)
    assert set(loaded) == set(dd)
    for split in dd:
        assert loaded[split].num_rows == dd[split].num_rows > 0
    cols = set(loaded[next(iter(loaded))].column_names)
    expected = {"preference": {"prompt", "chosen", "rejected", "label_prob", "margin"},
                "preference_chat": {"prompt", "chosen", "rejected"}, "unpaired": {"prompt", "completion", "label"},
                "sft": {"messages"}}[fmt]
    assert expected <= cols


def test_split_is_by_prompt_and_near_duplicates_stay_together(store_path):
    with Store.open(store_path, read_only=True) as s:
        prompt_ids = {r["text"]: r["prompt_id"] for r in s.query("SELECT * FROM prompts")}
        for seed in range(8):  # whatever the split, the two near-identical prompts never part
            dd, stats = build_export(s, "preference", ExportFilter(test_fraction=0.5, seed=seed))
            sides = {split: set(ds["prompt_id"]) for split, ds in dd.items()}
            if len(sides) == 2:
                assert not sides["train"] & sides["test"]
            where = {split for split, ids in sides.items() if prompt_ids[NEAR_A] in ids or prompt_ids[NEAR_B] in ids}
            assert len(where) <= 1
        rows = s.query("""SELECT p.text AS prompt, chosen_text, rejected_text, label FROM preference_pairs
                          JOIN prompts p USING (prompt_id) WHERE dropped_reason IS NULL""")
    from factory.export import text_hash

    groups = {}
    for r in rows:
        groups.setdefault(text_hash(r["prompt"], r["chosen_text"], r["rejected_text"]), []).append(r)
    assert stats["exact_duplicates_removed"] == len(rows) - len(groups) >= 1  # includes the injected copy
    assert stats["near_duplicate_prompts_grouped"] >= 1
    kept = dd["train"].to_list() + (dd["test"].to_list() if "test" in dd else [])
    by_hash = {text_hash(k["prompt"].removeprefix("Human: ").removesuffix("\n\nAssistant:"), k["chosen"][1:],
                         k["rejected"][1:]): k for k in kept}
    for h, members in groups.items():
        if any(m["label"] is not None for m in members):  # the soft label survives deduplication
            assert by_hash[h]["label_prob"] is not None


def _tiny_chat_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    return tok


@pytest.mark.parametrize("fmt", ["preference", "preference_chat", "unpaired", "sft"])
def test_trl_trainers_take_a_step_on_exports_without_conversion(store_path, tmp_path, tiny_model_dir, fmt):
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    with Store.open(store_path, read_only=True) as s:
        dd, _ = build_export(s, fmt, ExportFilter(test_fraction=0.0))
    write_export(dd, str(tmp_path / "out"), "parquet")
    ds = load_dataset("parquet", data_files={"train": str(tmp_path / "out" / "train.parquet")})["train"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = model.get_input_embeddings().weight.detach().clone()
    common = dict(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2, report_to="none",
                  use_cpu=True, save_strategy="no", learning_rate=1e-3, logging_steps=1)
    tok = _tiny_chat_tokenizer(tiny_model_dir)
    if fmt.startswith("preference"):
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, max_length=128), train_dataset=ds, processing_class=tok)
    elif fmt == "unpaired":
        trainer = KTOTrainer(model=model, args=KTOConfig(**common, max_length=128), train_dataset=ds, processing_class=tok)
    else:
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=128), train_dataset=ds, processing_class=tok)
    out = trainer.train()
    assert out.training_loss == out.training_loss  # not NaN
    assert not torch.equal(before, model.get_input_embeddings().weight.detach())


def _publish(store_path, folder):
    return build_folder(store_path, "latest", "factory-test/cai-demo", folder, ExportFilter(test_fraction=0.3))


def test_published_folder_loads_for_every_config_and_split(store_path, tmp_path):
    from huggingface_hub import DatasetCard

    result = _publish(store_path, tmp_path / "hub")
    card = DatasetCard.load(tmp_path / "hub" / "README.md")
    configs = {c["config_name"]: c for c in card.data.to_dict()["configs"]}
    assert set(configs) == set(result["configs"]) and "preference" in configs
    for name, c in configs.items():
        for df in c["data_files"]:
            ds = load_dataset(str(tmp_path / "hub"), name, split=df["split"])
            assert ds.num_rows == result["rows"][name][df["split"]] > 0
    meta = card.data.to_dict()
    for key in ("license", "task_categories", "tags", "size_categories", "pretty_name"):
        assert meta[key]
    text = (tmp_path / "hub" / "README.md").read_text()
    assert "## Constitution: harmless" in text and "avoid-harm" in text and "position consistency" in text
    assert yaml.safe_load((tmp_path / "hub" / "constitution.yaml").read_text())["id"] == "harmless"
    prov = json.loads((tmp_path / "hub" / "provenance.json").read_text())
    assert prov["run_id"] == result["run_id"] and prov["files"] and prov["constitution"]["id"] == "harmless"


def test_publishing_twice_is_idempotent_and_keeps_user_metadata(store_path, tmp_path):
    folder = tmp_path / "hub"
    _publish(store_path, folder)
    readme = folder / "README.md"
    head, body = readme.read_text()[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head)
    meta["annotations_creators"] = ["machine-generated"]  # what a user might add by hand
    readme.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body)
    snapshot = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    _publish(store_path, folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == snapshot
    assert yaml.safe_load(readme.read_text()[4:].split("\n---\n", 1)[0])["annotations_creators"] == ["machine-generated"]


def test_license_is_the_users_unless_given_explicitly(store_path, tmp_path):
    folder = tmp_path / "hub"

    def card_license():
        return yaml.safe_load((folder / "README.md").read_text()[4:].split("\n---\n", 1)[0])["license"]

    _publish(store_path, folder)
    assert card_license() == "cc-by-4.0"  # a new card gets the default
    (folder / "README.md").write_text((folder / "README.md").read_text().replace("license: cc-by-4.0", "license: mit", 1))
    _publish(store_path, folder)
    assert card_license() == "mit"  # the user's edit survives a re-publish
    build_folder(store_path, "latest", "me/demo", folder, license="apache-2.0")
    assert card_license() == "apache-2.0"  # an explicit license wins


def test_token_is_never_written(store_path, tmp_path, monkeypatch):
    token = "hf_FAKEtoken1234567890abcdefSECRET"
    monkeypatch.setenv("HF_TOKEN", token)
    _publish(store_path, tmp_path / "hub")
    for path in list((tmp_path / "hub").rglob("*")) + [Path(store_path)]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
