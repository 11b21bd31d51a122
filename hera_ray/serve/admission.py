"""Admission control for the ingress: a bound on agent runs in flight, refused at once past it.

Without it an ingress takes every run it is sent (Serve's proxy queues them without bound), so a
burst turns into minutes of queueing for everyone. With it the client hears 429 + Retry-After
at once and can back off or try another replica.
"""

from __future__ import annotations

from hera_ray.errors import RateLimited

#: What a refused run is told to wait: runs take seconds, so a second is a reasonable first backoff.
RETRY_AFTER_S = 1.0


class AdmissionGate:
    """Counts runs in flight on one ingress replica; :meth:`enter` refuses past ``limit``.

    >>> gate = AdmissionGate(1)
    >>> gate.enter(); gate.in_flight
    1
    >>> gate.leave(); gate.in_flight
    0
    """

    def __init__(self, limit: int, retry_after_s: float = RETRY_AFTER_S):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0

    def enter(self) -> None:
        """Take a slot, or raise :class:`RateLimited` (429) if all ``limit`` are taken."""
        if self.in_flight >= self.limit:
            raise RateLimited(f"this ingress replica is running {self.in_flight} agent runs, its limit "
                              f"(ingress.max_concurrent_runs); retry shortly", retry_after_s=self.retry_after_s)
        self.in_flight += 1

    def leave(self) -> None:
        """Give a slot back (exactly once per successful :meth:`enter`)."""
        if self.in_flight <= 0:
            raise RuntimeError("AdmissionGate.leave without a matching enter")
        self.in_flight -= 1
