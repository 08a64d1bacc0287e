"""Fixtures every Python test folder shares (see tests/support)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from runtime_process import RuntimeProcess


@pytest.fixture()
def runtime_process() -> Iterator[Callable[..., RuntimeProcess]]:
    """Starts runtimes (`runtime_process(*args, **options)`, see
    `RuntimeProcess`) and stops every one at the end of the test."""
    started: list[RuntimeProcess] = []

    def start(*args: str, **options) -> RuntimeProcess:
        started.append(RuntimeProcess(*args, **options))
        return started[-1]

    yield start
    for runtime in started:
        runtime.stop()
