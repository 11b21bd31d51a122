"""The SBERT estimator as a Serve deployment: concurrent callers are batched, answers match SBERT."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PAIRS = [("Compute the total number of apples.", "Add up how many apples there are in all."),
         ("Compute the total number of apples.", "Translate the sentence into French."),
         ("Find the price of one egg.", "Work out what a single egg costs.")] * 10


@pytest.fixture(scope="module")
def similarity_handle(cluster):
    from ray import serve

    from hera_ray.serve.estimators import build_similarity_deployment

    handle = serve.run(build_similarity_deployment(), name="hera-sbert", route_prefix=None)
    yield handle
    handle.shutdown()
    serve.delete("hera-sbert")


def test_concurrent_similarity_calls_match_direct_sbert(similarity_handle):
    from hera_ray.estimators.similarity import SbertSimilarity

    async def all_at_once():
        return await asyncio.gather(*(similarity_handle.similarity.remote(pair) for pair in PAIRS))

    served = asyncio.run(all_at_once())
    direct = SbertSimilarity().similarities(PAIRS)
    assert served == pytest.approx(direct, abs=1e-4)
    assert served[0] > 0.6 > served[1]
