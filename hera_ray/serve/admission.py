"""Admission control for the ingress: a bound on agent runs in flight, refused at once past it.

Without it an ingress takes every run it is sent (Serve's proxy queues them without bound), so a
burst turns into minutes of queueing for everyone. With it the client hears 429 + Retry-After
at once and can back off or try another replica.
"""

from __future__ import annotations

from hera_ray.errors import RateLimited

#: What a refused run is told to wait before any run has finished here, and the bounds of the
#: estimate that replaces it (the mean run time over the limit: when, on average, a slot frees).
RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 30.0


class AdmissionGate:
    """Counts runs in flight on one ingress replica; :meth:`enter` refuses past ``limit``.

    >>> gate = AdmissionGate(1)
    >>> gate.enter(); gate.in_flight
    1
    >>> gate.leave(run_s=40.0); gate.in_flight
    0
    >>> gate.retry_after_s  # one slot, runs take 40 s: a slot frees in about 40 s (capped at 30)
    30.0
    """

    def __init__(self, limit: int, retry_after_s: float = RETRY_AFTER_S, max_retry_after_s: float = MAX_RETRY_AFTER_S):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit, self.first_retry_after_s, self.max_retry_after_s = limit, retry_after_s, max_retry_after_s
        self.in_flight = 0
        self.mean_run_s: float | None = None  # moving average of finished runs' durations

    @property
    def retry_after_s(self) -> float:
        """What a refused client is told to wait: about when the next slot frees, given how long runs take."""
        if self.mean_run_s is None:
            return self.first_retry_after_s
        return min(self.max_retry_after_s, max(self.first_retry_after_s, self.mean_run_s / self.limit))

    def enter(self) -> None:
        """Take a slot, or raise :class:`RateLimited` (429) if all ``limit`` are taken."""
        if self.in_flight >= self.limit:
            raise RateLimited(f"this ingress replica is running {self.in_flight} agent runs, its limit "
                              f"(ingress.max_concurrent_runs); retry shortly", retry_after_s=self.retry_after_s)
        self.in_flight += 1

    def leave(self, run_s: float | None = None) -> None:
        """Give a slot back (exactly once per successful :meth:`enter`); ``run_s``, how long the run took."""
        if self.in_flight <= 0:
            raise RuntimeError("AdmissionGate.leave without a matching enter")
        self.in_flight -= 1
        if run_s is not None and run_s >= 0:
            self.mean_run_s = run_s if self.mean_run_s is None else 0.8 * self.mean_run_s + 0.2 * run_s
