"""The shipped model is prepared once, verified by checksum, and reused."""

import pytest

from factory.models import list_models, prepare_default_model, resolve_model, verify_model_dir, write_manifest

pytestmark = pytest.mark.integration


def test_prepare_is_idempotent_and_listed(shipped_model_dir):
    weights = shipped_model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_default_model() == shipped_model_dir
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert resolve_model("default") == shipped_model_dir
    listed = {m["name"]: m for m in list_models()}
    assert listed["gemma-3-270m"]["ok"] and listed["gemma-3-270m"]["bytes"] > 1e9


def test_verify_detects_changed_or_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    assert not verify_model_dir(tmp_path)  # no manifest yet
    write_manifest(tmp_path, name="t")
    assert verify_model_dir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x01" * 64)
    assert not verify_model_dir(tmp_path)
    write_manifest(tmp_path, name="t")
    (tmp_path / "weights.bin").unlink()
    assert not verify_model_dir(tmp_path)


def test_resolve_model_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model(str(tmp_path / "nope"))
