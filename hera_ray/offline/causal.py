"""LoRA adapters on the bundled SLM: train them in PyTorch, run them in llama.cpp.

The generative estimators (SP, the subtask predictor; SD, the subtask decomposer) are LoRA
adapters on SmolLM2-135M-Instruct. Training needs autograd, so it runs in transformers + peft on
the fp32 weights transformers dequantizes from the bundled Q4_1 GGUF. Serving runs in llama.cpp
(several times faster on a CPU), so :func:`export_lora_gguf` rewrites the peft adapter as a
llama.cpp LoRA GGUF over the *same* base file. Because the base weights are the same values in
both runtimes, the adapter's effect carries over unchanged (up to llama.cpp's Q8 activations).

The one non-obvious step of the export: llama.cpp's HF->GGUF conversion permutes the rows of
``q_proj`` and ``k_proj`` of llama models (its rope kernel pairs neighbouring dimensions, HF's
pairs the two halves of each head), and transformers undoes that when it reads a GGUF. A LoRA
delta ``B @ A`` on those projections must therefore get the same row permutation, which is a
permutation of the rows of ``B`` only.

torch, transformers and peft are imported inside the functions so that importing this module
(e.g. by the CLI for ``--help``) stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from hera_ray.offline.loop import fit

if TYPE_CHECKING:
    import numpy as np

#: The chat template's end-of-turn token: appended to every target so the adapter learns to stop.
END_OF_TURN = "<|im_end|>"

#: peft (HF) module name -> llama.cpp tensor name inside ``blk.{i}``.
HF_TO_GGUF = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}

_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

#: (messages, target), or (messages, target, continue_final_message[, end]): see encode_example.
Example = tuple

_BASE_CACHE: dict[str, tuple[Any, Any]] = {}


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------


def load_base(base_gguf: Path) -> tuple[Any, Any]:
    """The base model (fp32 ``LlamaForCausalLM``, eval mode, on CPU) and its tokenizer.

    Reading a GGUF in transformers takes ~15 s on this class of CPU (it parses the 49k-token
    vocabulary three times), so the first call writes the dequantized model to a folder in the
    hera cache and later processes load that folder in ~1 s. Within a process the pair is kept:
    callers that change the model (LoRA injection) must work on a ``copy.deepcopy``.
    """
    base_gguf = Path(base_gguf).resolve()
    key = str(base_gguf)
    if key not in _BASE_CACHE:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = _converted_base(base_gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        _BASE_CACHE[key] = (model, tokenizer)
    return _BASE_CACHE[key]


def _converted_base(base_gguf: Path) -> Path:
    """A Hugging Face folder (fp32 safetensors, config, tokenizer) holding ``base_gguf``'s weights.

    fp32 keeps the dequantized Q4_1 values exact, which is what lets the llama.cpp run of an
    adapter match the peft run. The folder name carries the GGUF's size and mtime, so a changed
    file gets a new folder; it is written under a temporary name and renamed when complete, so an
    interrupted or concurrent conversion never leaves a half folder that looks finished.
    """
    from hera_ray.models import cache_dir

    stat = base_gguf.stat()
    tag = hashlib.sha1(f"{base_gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "hf" / f"{base_gguf.stem}.fp32-{tag}"
    if (folder / "config.json").exists():
        return folder

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.19 may keep GGUF weights packed; we need plain dense ones
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(base_gguf.parent, gguf_file=base_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(base_gguf.parent, gguf_file=base_gguf.name,
                                                 dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def encode_example(tokenizer: Any, messages: list[dict[str, str]], target: str,
                   max_len: int, continue_final_message: bool = False, end: str | None = None
                   ) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 = no loss) of one (chat prompt, target reply) pair.

    The prompt and the target are tokenized separately, exactly as llama.cpp sees them at
    inference (the rendered prompt, then generated tokens), and ``<|im_end|>`` ends the target so
    the adapter learns where to stop. A long prompt loses tokens from its left (the oldest
    context); the target is kept, and cut only if it alone does not fit.

    With ``continue_final_message`` the last (assistant) message is left open and the target is the
    next line of it (the agent's step format). ``end`` closes the target: default ``<|im_end|>``,
    or a newline for a continued message; a line of the chain gives "\n" even at step 0.
    """
    if continue_final_message:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        prompt += messages[-1]["content"]
    else:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if end is None:
        end = "\n" if continue_final_message else END_OF_TURN
    p_ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t_ids: list[int] = tokenizer(target + end, add_special_tokens=False)["input_ids"]
    t_ids = t_ids[: max(1, max_len - 1)]
    p_ids = p_ids[max(0, len(p_ids) - (max_len - len(t_ids))):]
    return p_ids + t_ids, [-100] * len(p_ids) + t_ids


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hide the FutureWarning peft triggers by reading a property transformers 5 deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _target_loss(model: Any, ids: Any, mask: Any, labels: Any) -> Any:
    """Mean next-token cross-entropy over the target tokens only.

    Same value as ``model(..., labels=labels).loss``, but the 49k-wide output layer (and its
    softmax) runs only at the few target positions instead of at every prompt position too:
    about a fifth less work per step on short targets.
    """
    import torch.nn.functional as F

    causal_lm = model.get_base_model()  # LoRA layers are injected into its modules
    hidden = causal_lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    next_labels = labels[:, 1:]
    keep = next_labels != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), next_labels[keep])


def train_causal_lora(examples: list[Example], base_gguf: Path, out_dir: Path, *, r: int = 8,
                      alpha: float = 16, target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                      epochs: int = 2, lr: float = 1e-3, batch_size: int = 4, max_len: int = 512, seed: int = 0,
                      progress: bool = True) -> dict[str, Any]:
    """Fit a LoRA adapter so the base model answers each prompt with its target; export it.

    Writes the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the
    llama.cpp adapter ``adapter.gguf`` into ``out_dir``. AdamW with a linear decay of the learning
    rate to 0 over all steps; loss only on the target tokens. Returns
    ``{"steps", "final_loss", "train_s", "examples"}`` (``final_loss`` is the mean over the last
    epoch, which is less noisy than the last batch).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    if not examples:
        raise ValueError("no training examples")
    unknown = sorted(set(target_modules) - set(HF_TO_GGUF))
    if unknown:
        raise ValueError(f"target modules {unknown} have no llama.cpp LoRA tensor; use some of {sorted(HF_TO_GGUF)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)

    base, tokenizer = load_base(base_gguf)
    encoded = [encode_example(tokenizer, ex[0], ex[1], max_len, bool(ex[2]) if len(ex) > 2 else False,
                              ex[3] if len(ex) > 3 else None) for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    with _quiet_peft():
        model = get_peft_model(copy.deepcopy(base), config)  # the cached base stays clean

    def batch_loss(idx: list[int]) -> Any:
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # right padding: positions stay 0.. as in inference
            tokens, labs = encoded[i]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, :len(labs)] = torch.tensor(labs)
            mask[row, :len(tokens)] = 1
        return _target_loss(model, ids, mask, labels)

    stats = fit(model, [len(e[0]) for e in encoded], batch_loss, epochs=epochs, lr=lr, batch_size=batch_size,
                rng=rng, desc="LoRA", progress=progress)
    model.save_pretrained(out_dir)
    export_lora_gguf(out_dir, base_gguf, out_dir / "adapter.gguf")
    return {**stats, "examples": len(examples)}


def load_adapter(base_gguf: Path, peft_dir: Path) -> tuple[Any, Any]:
    """(peft model with the adapter from ``peft_dir``, tokenizer), for checks against llama.cpp."""
    from peft import PeftModel

    base, tokenizer = load_base(base_gguf)
    with _quiet_peft():
        model = PeftModel.from_pretrained(copy.deepcopy(base), Path(peft_dir))
    model.eval()
    return model, tokenizer


def generate_hf(model_with_adapter: Any, tokenizer: Any, messages: list[dict[str, str]], max_tokens: int) -> str:
    """Greedy reply in transformers: the reference the llama.cpp run of the adapter must match."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    with torch.no_grad():
        out = model_with_adapter.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                          do_sample=False, eos_token_id=end, pad_token_id=end)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Export to a llama.cpp LoRA GGUF
# --------------------------------------------------------------------------------------------


def export_lora_gguf(peft_dir: Path, base_gguf: Path, out_path: Path) -> Path:
    """Write the peft LoRA adapter in ``peft_dir`` as a llama.cpp LoRA GGUF for ``base_gguf``.

    The layout is what llama.cpp's ``convert_lora_to_gguf.py`` writes: ``general.type=adapter``,
    ``adapter.type=lora``, ``adapter.lora.alpha``; per module ``blk.{i}.{name}.weight.lora_a``
    (numpy shape ``[r, n_in]``, peft's ``lora_A``) and ``.lora_b`` (``[n_out, r]``, peft's
    ``lora_B``), f32. llama.cpp scales by ``alpha / rank`` with the rank read from the tensor, as
    peft does; any other peft scaling (rsLoRA, per-module rank or alpha) is folded into
    ``lora_b`` so the product comes out the same. The rows of ``lora_b`` of ``q_proj``/``k_proj``
    get llama.cpp's rope permutation (see the module docstring).
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    peft_dir, out_path = Path(peft_dir), Path(out_path)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise ValueError("DoRA adapters have no llama.cpp LoRA equivalent")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type={cfg.get('peft_type')}")
    arch = read_gguf_metadata(base_gguf, ("general.architecture",)).get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{base_gguf} is a {arch!r} model; this exporter knows the tensor layouts of 'llama' and 'qwen2'")
    meta = read_gguf_metadata(base_gguf, (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"))
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    # llama.cpp's converter permutes llama's q/k rows for its rope kernel; qwen2 uses NeoX-style
    # rope, whose layout is HF's own, so its rows are written as they are.
    permute = arch == "llama"

    alpha = float(cfg["lora_alpha"])
    weights = load_file(str(peft_dir / "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    paths: dict[tuple[int, str], str] = {}  # module path as peft matches its patterns against
    for key, value in weights.items():
        m = _PEFT_KEY.search(key)
        if m is None:
            raise ValueError(f"adapter tensor {key!r} is not a LoRA A/B weight of a llama layer")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in HF_TO_GGUF:
            raise ValueError(f"adapter tensor {key!r}: module {module!r} has no llama.cpp LoRA tensor")
        pairs.setdefault((layer, module), {})[which] = value.astype(np.float32)
        paths[(layer, module)] = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]

    writer = gguf.GGUFWriter(str(out_path), arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {layer} {module}: lora_A or lora_B missing")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ValueError(f"layer {layer} {module}: lora_A {a.shape} and lora_B {b.shape} disagree on the rank")
        peft_scale = _peft_scale(cfg, paths[(layer, module)], rank)
        if not math.isclose(peft_scale, alpha / rank, rel_tol=1e-6):
            b = b * np.float32(peft_scale / (alpha / rank))
        if permute and module == "q_proj":
            b = _rope_permute(b, n_head)
        elif permute and module == "k_proj":
            b = _rope_permute(b, n_head_kv)
        name = f"blk.{layer}.{HF_TO_GGUF[module]}.weight"
        writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _peft_scale(cfg: dict[str, Any], module_path: str, rank: int) -> float:
    """The factor peft multiplies ``B @ A`` by for this module (``alpha_pattern``, rsLoRA).

    A pattern applies when it matches the end of the module path (peft's ``get_pattern_key``).
    """
    alpha = float(cfg["lora_alpha"])
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            alpha = float(value)
            break
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of the output rows of a q/k projection (or its LoRA B)."""
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """The scalar/string values of ``keys`` from a GGUF header, stopping once all are found.

    ``gguf.GGUFReader`` parses every field up front, including the vocabulary arrays, which
    takes seconds; the model hyperparameters sit before the vocabulary, so this reads a few KB.
    """
    wanted, found = set(keys), {}
    with Path(path).open("rb") as f:

        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def read_str() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def read_value(vtype: int) -> Any:
            if vtype == 8:
                return read_str()
            if vtype == 9:
                item_type, count = read("<I"), read("<Q")
                return [read_value(item_type) for _ in range(count)]
            return read(_GGUF_SCALARS[vtype])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, vtype = read_str(), read("<I")
            value = read_value(vtype)
            if key in wanted:
                found[key] = value
                if len(found) == len(wanted):
                    break
    return found
