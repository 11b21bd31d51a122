"""hera-ray: per-subtask edge-cloud routing for AI agents (HERA, arXiv 2504.00434) on Ray."""

__version__ = "0.2.0"


def __getattr__(name: str):
    # Lazy, so `import hera_ray` stays light (an edge box has neither Ray nor httpx clients in use).
    if name in ("Client", "submit"):
        from hera_ray import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["Client", "submit", "__version__"]
