"""Convert a GGUF model into a Hugging Face folder (config.json, safetensors, tokenizer), offline.

vLLM loads Hugging Face folders; the bundled models are GGUF files. transformers reads GGUF files
of llama-family models (it dequantizes the weights with the ``gguf`` package) and writes them back
with ``save_pretrained``. Nothing is fetched from a model hub: ``HF_HUB_OFFLINE=1`` is set before
transformers is imported.

    python scripts/gguf_to_hf.py                       # bundled SmolLM2-135M -> ~/.cache/hera-ray/hf/smollm2-135m
    python scripts/gguf_to_hf.py --gguf my.gguf --out /tmp/my-hf

An output folder that already holds a config.json is left alone (use --force to redo it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

DEFAULT_MODEL = "smollm2-135m"


def default_out(name: str = DEFAULT_MODEL) -> Path:
    from hera_ray.models import cache_dir

    return cache_dir() / "hf" / name


def convert(gguf: Path, out: Path, *, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Write ``out`` (config, weights, tokenizer) from ``gguf``; return ``out``."""
    if (out / "config.json").exists() and not force:
        print(f"{out} already holds a converted model (config.json): nothing to do")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype),
                                                 **_dequantize_kwargs())
    _drop_gguf_quantizer(model)
    # Write into a sibling folder, then rename: an interrupted run leaves no half folder behind
    # that the config.json check would take for a finished one.
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"converted {gguf.name} -> {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{dtype}, chat template: {'yes' if tokenizer.chat_template else 'no'}) in {time.perf_counter() - t0:.1f} s")
    return out


def _dequantize_kwargs() -> dict:
    """Ask for plain dense weights. transformers >= 5.19 keeps GGUF weights packed by default (when a
    kernel is available), and a packed model cannot be saved; older releases always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model) -> None:
    """The weights are dense now, but the GGUF quantizer stays attached and save_pretrained refuses to
    write a "quantized" model: detach it (and the quantization_config it put in the config)."""
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise RuntimeError(f"GGUF weights stayed packed in {len(packed)} modules (e.g. {packed[0]}); cannot save them")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help=f"GGUF file or bundled model name (default: {DEFAULT_MODEL})", default=DEFAULT_MODEL)
    ap.add_argument("--out", help="output folder (default: ~/.cache/hera-ray/hf/<name>)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the saved weights (default: bfloat16)")
    ap.add_argument("--force", action="store_true", help="convert again even if the output exists")
    args = ap.parse_args(argv)

    from hera_ray.errors import HeraError
    from hera_ray.models import resolve_model

    try:
        resolved = resolve_model(args.gguf)
    except HeraError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    if resolved.kind != "gguf":
        print(f"error: {resolved.path} is not a GGUF file", file=sys.stderr)
        return 2
    name = args.gguf if resolved.bundled else resolved.name
    out = Path(args.out).expanduser() if args.out else default_out(name)
    convert(resolved.path, out, dtype=args.dtype, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
