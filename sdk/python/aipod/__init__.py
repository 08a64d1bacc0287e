"""aipod: call ML models served by aipod, and serve Python models to it.

- the client (``pip install "aipod[client]"``): :class:`Client`,
  :class:`AsyncClient`, :class:`Result`, :class:`Progress`,
  :class:`CallError`, :class:`RetryPolicy`;
- the worker side, :mod:`aipod.worker`, which uses the standard library only.

The client's names are imported on first use, so ``import aipod.worker``
never needs grpc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["AsyncClient", "CallError", "Client", "Progress", "Result", "RetryPolicy"]

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .client import Client
    from .types import CallError, Progress, Result, RetryPolicy

_WHERE = {
    "Client": ".client",
    "AsyncClient": ".aio",
    "CallError": ".types",
    "Progress": ".types",
    "Result": ".types",
    "RetryPolicy": ".types",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'aipod' has no attribute {name!r}")
    import importlib

    try:
        value = getattr(importlib.import_module(module, __name__), name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in {"grpc", "grpc_health", "zstandard", "google"}:
            raise ImportError(
                f"aipod.{name} needs the client dependencies ({e.name} is missing): pip install 'aipod[client]'"
            ) from e
        raise
    globals()[name] = value
    return value
