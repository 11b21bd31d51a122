"""Copy what serving needs from a `hera train` folder into the package's bundled estimator set.

    python scripts/bundle_estimators.py runs/estimators [hera_ray/estimators/trained/default] [data/profiles]

Serving needs the manifest, the encoder adapters (peft) with their labels, the logistic models'
JSON (the step classifier; DP over the SLM's confidence), and the llama.cpp adapters
(``adapter.gguf``) of SP and SD; the peft copies of the causal adapters stay behind.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ENCODER_FILES = ("adapter_config.json", "adapter_model.safetensors", "labels.json", "metrics.json")
CAUSAL_FILES = ("adapter.gguf", "metrics.json")
BASE_ONLY_FILES = ("metrics.json",)  # a generative estimator served as the base model itself


def bundle(src: Path, dst: Path, profile_path: str | None = None) -> None:
    """``profile_path``: where the profile lives in the repo (the manifest records the training run's path)."""
    manifest = json.loads((src / "manifest.json").read_text())
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name, entry in manifest["estimators"].items():
        if entry["kind"] == "logistic":  # the step classifier, DP over the SLM's confidence: one JSON file
            files: tuple[str, ...] = (Path(entry["path"]).name, "metrics.json")
        else:
            files = ENCODER_FILES if entry["kind"] == "encoder" else CAUSAL_FILES if entry.get("path") else BASE_ONLY_FILES
        (dst / name).mkdir()
        for f in files:
            shutil.copy2(src / name / f, dst / name / f)
        if entry["kind"] == "encoder":  # name the base as bundled, not by this machine's path
            cfg_path = dst / name / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = json.loads((dst / name / "labels.json").read_text())["base"]
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if (src / "verifier.json").exists():  # where hera-verify looks for its step classifier
        shutil.copy2(src / "verifier.json", dst / "verifier.json")
    manifest["profile"]["path"] = profile_path or manifest["profile"]["path"]
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"bundled {len(manifest['estimators'])} estimators into {dst} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    bundle(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else
           Path(__file__).resolve().parents[1] / "hera_ray" / "estimators" / "trained" / "default",
           sys.argv[3] if len(sys.argv) > 3 else None)
