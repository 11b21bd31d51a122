"""A cache of deterministic generations, keyed on (model file, engine settings, request).

At temperature 0 a model file given the same prompt and settings writes the same text. A benchmark
runs many policies and sweep points over the same requests, and they reach many of the same steps:
every policy's first SLM step of a request is the same call. With the cache on, an engine answers
such a call from the cache instead of decoding it again; the result says so (``cache_hit``), the
agent's trace records it per step, and ``hera bench`` reports the hit rate.

It is off unless configured (``cloud.generation_cache`` for the cloud deployment and the edges that
``hera up`` starts, ``hera edge serve --generation-cache`` for an edge box). It is meant for
evaluation: a hit returns the stored text, token counts and engine times, but takes no engine time,
so latency measured with it on is not the engine's. Only temperature-0 requests are cached.

The store is one SQLite file (stdlib ``sqlite3``, WAL mode), so the engines of one machine (edge
workers and cloud replicas, each its own process) share it. What a key holds:

* the model file (resolved path, size and modification time: a re-quantised file misses);
* the engine (llama-cpp-python's version) and its settings that can change the text (context window);
* the prompt as the engine tokenised it (so a changed chat template misses), and every other field
  of the request except its ``request_id``;
* the cache's own format version.

A hit reports no engine time (``ttft_s`` and ``decode_s`` are 0: the engine spent none). The file
failing (locked past a few seconds, disk full, read-only) is logged and counts as a miss: the
engine runs the request as if there were no cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Sequence

from hera_ray.generation import GenerationParams, GenerationResult

log = logging.getLogger(__name__)
#: Bumped when what a key covers or a stored row holds changes: old rows then miss.
FORMAT = 1
_RESULT_FIELDS = {f.name for f in dataclasses.fields(GenerationResult)}


class GenerationCache:
    """Stored results of temperature-0 generations of one model file.

    >>> cache = GenerationCache("/tmp/gen.sqlite", model_file)  # doctest: +SKIP
    >>> key = cache.key(params, {"n_ctx": 2048})                 # doctest: +SKIP
    >>> cache.get(key) or cache.put(key, run(params))            # doctest: +SKIP
    """

    def __init__(self, path: str | Path, model_file: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        model = Path(model_file).expanduser().resolve()
        st = model.stat()
        self.model_key = f"{model}|{st.st_size}|{st.st_mtime_ns}"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, model TEXT NOT NULL, result TEXT NOT NULL)")
        self.hits = 0
        self.misses = 0

    def key(self, p: GenerationParams, engine: dict[str, Any], tokens: Sequence[int] | None = None) -> str | None:
        """The request's key, or None when it is not deterministic (temperature above 0).

        ``tokens``: the prompt as the engine tokenised it (then the messages themselves are left out)."""
        if p.temperature > 0:
            return None
        request = p.to_dict()
        request.pop("request_id", None)
        if not request.get("candidate_splits"):  # added later: a request without splits keeps its old key
            request.pop("candidate_splits", None)
        if not request.get("rewrite_below"):  # likewise
            request.pop("rewrite_below", None)
        if tokens is not None:
            request.pop("messages", None)
            request.pop("prompt", None)
            request["tokens"] = list(tokens)
        blob = json.dumps({"format": FORMAT, "model": self.model_key, "engine": engine, "request": request}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str | None, request_id: str = "") -> GenerationResult | None:
        """The stored result for ``key`` (marked ``cache_hit``, with this request's id, no queueing and no
        engine time), or None."""
        if key is None:
            return None
        try:
            with self._lock:
                row = self._db.execute("SELECT result FROM generations WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            log.warning("generation cache %s unreadable, running the request: %s", self.path, e)
            row = None
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        stored = {k: v for k, v in json.loads(row[0]).items() if k in _RESULT_FIELDS}
        return dataclasses.replace(GenerationResult(**stored), request_id=request_id, queue_s=0.0, ttft_s=0.0,
                                   decode_s=0.0, cache_hit=True)

    def put(self, key: str | None, result: GenerationResult) -> GenerationResult:
        """Store ``result`` under ``key`` (the first result stored for a key stays); return it."""
        if key is not None and not result.cache_hit:
            data = {**result.to_dict(), "request_id": "", "cache_hit": False}
            try:
                with self._lock:
                    self._db.execute("INSERT OR IGNORE INTO generations (key, model, result) VALUES (?, ?, ?)",
                                     (key, self.model_key, json.dumps(data)))
            except sqlite3.Error as e:
                log.warning("generation cache %s unwritable, result not stored: %s", self.path, e)
        return result

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM generations WHERE model = ?", (self.model_key,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
