"""Real SBERT (the bundled MiniLM) scores paraphrased subtasks above unrelated ones."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sbert():
    from hera_ray.estimators.similarity import SbertSimilarity

    return SbertSimilarity()


def test_paraphrases_score_above_unrelated_subtasks(sbert):
    same, related, unrelated = sbert.similarities([
        ("Compute the total number of apples.", "Compute the total number of apples."),
        ("Compute the total number of apples.", "Add up how many apples there are in all."),
        ("Compute the total number of apples.", "Translate the sentence into French."),
    ])
    assert same == pytest.approx(1.0, abs=1e-4)
    assert related > 0.6 > unrelated
    assert -1.0 <= unrelated <= 1.0


def test_async_interface_matches_the_batch_one(sbert):
    a, b = "Find the price per egg.", "Work out what one egg costs."
    assert asyncio.run(sbert.similarity(a, b)) == pytest.approx(sbert.similarities([(a, b)])[0], abs=1e-6)
