"""A LoRA adapter trained in PyTorch behaves the same after export to llama.cpp (real SmolLM2).

The adapter learns a reply the base model never writes ("ZORBLAX-7 <word>"), so "the adapter is
active in llama.cpp" is a yes/no question. "Active the same way" is checked two ways: greedy
replies equal the peft/transformers ones token for token, and the change the adapter makes to
the next-token logits in llama.cpp lines up with the change it makes in transformers (the q/k
row permutation of the export is what makes them line up; the test shows that as well).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)

WORDS = ["apple", "river", "candle", "mountain", "pencil", "tiger", "window", "garden"]
HELD_OUT = "bridge"
SECRET = "ZORBLAX-7"


def ask(word: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is the secret word for {word}?"}]


@pytest.fixture(scope="module")
def base_gguf() -> Path:
    from hera_ray.models import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="module")
def trained(base_gguf: Path, tmp_path_factory) -> tuple[Path, dict]:
    from hera_ray.offline.causal import train_causal_lora

    out = tmp_path_factory.mktemp("lora")
    examples = [(ask(w), f"{SECRET} {w}") for w in WORDS]
    info = train_causal_lora(examples, base_gguf, out, epochs=6, lr=3e-3, progress=False)
    return out, info


@pytest.fixture(scope="module")
def generators(base_gguf: Path, trained):
    from hera_ray.estimators.generative import LoraGenerator

    out, _ = trained
    plain, adapted = LoraGenerator(base_gguf), LoraGenerator("smollm2-135m", adapter=out / "adapter.gguf")
    yield plain, adapted
    plain.close()
    adapted.close()


def test_training_writes_both_adapters_and_learns(trained):
    out, info = trained
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter.gguf").read_bytes()[:4] == b"GGUF"
    assert info["steps"] == 12 and info["examples"] == len(WORDS)
    assert info["final_loss"] < 0.2


def test_adapter_gguf_has_llama_cpp_lora_layout(trained):
    from gguf import GGUFReader

    reader = GGUFReader(str(trained[0] / "adapter.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: ne0 first
    assert len(shapes) == 30 * 4 * 2
    assert shapes["blk.0.attn_q.weight.lora_a"] == (576, 8)  # numpy [r, n_in]
    assert shapes["blk.0.attn_k.weight.lora_b"] == (8, 192)  # numpy [n_out, r]; 3 kv heads x 64


def test_base_model_does_not_know_the_secret(generators):
    plain, _ = generators
    for word in (WORDS[0], HELD_OUT):
        assert SECRET not in plain.generate(ask(word), max_tokens=16)


def test_llama_cpp_with_adapter_replies_with_the_secret(generators):
    _, adapted = generators
    assert adapted.generate(ask(WORDS[0]), max_tokens=16) == f"{SECRET} {WORDS[0]}"
    assert adapted.generate(ask(HELD_OUT), max_tokens=16).startswith(SECRET)


def test_llama_cpp_matches_peft(base_gguf: Path, trained, generators):
    import torch

    from hera_ray.offline.causal import export_lora_gguf, generate_hf, load_adapter, load_base
    import hera_ray.offline.causal as causal

    out, _ = trained
    plain, adapted = generators
    peft_model, tokenizer = load_adapter(base_gguf, out)

    # Same greedy replies, token for token.
    for word in (WORDS[3], HELD_OUT):
        want = generate_hf(peft_model, tokenizer, ask(word), max_tokens=16)
        got = adapted.generate(ask(word), max_tokens=16)
        assert tokenizer(got)["input_ids"] == tokenizer(want)["input_ids"], (got, want)

    # The adapter's change to the next-token logits, on a prompt unlike the training ones.
    messages = [{"role": "user", "content": "Write a haiku about rain."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    base_model, _ = load_base(base_gguf)
    with torch.no_grad():
        hf_delta = (peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
                    - base_model(input_ids=torch.tensor([ids])).logits[0, -1]).numpy()

    def last_logits(llm) -> np.ndarray:
        import llama_cpp

        llm.reset()
        llm.eval(ids)  # without logits_all only the last position's logits are kept
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()

    from hera_ray.estimators.generative import LoraGenerator

    plain_logits = last_logits(plain.llm)
    cpp_delta = last_logits(adapted.llm) - plain_logits
    corr = float(np.corrcoef(hf_delta, cpp_delta)[0, 1])
    assert corr > 0.98, corr

    # Without the q/k row permutation the export is measurably wrong: the check above can tell.
    permute = causal._rope_permute
    try:
        causal._rope_permute = lambda rows, n_head: rows
        unpermuted = export_lora_gguf(out, base_gguf, out / "unpermuted.gguf")
    finally:
        causal._rope_permute = permute
    wrong = LoraGenerator(base_gguf, adapter=unpermuted)
    try:
        wrong_corr = float(np.corrcoef(hf_delta, last_logits(wrong.llm) - plain_logits)[0, 1])
    finally:
        wrong.close()
    assert wrong_corr < corr - 0.03, (wrong_corr, corr)
