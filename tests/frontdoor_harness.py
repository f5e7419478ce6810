"""The front door in this process, without Ray: a real FrontDoor over a real ModelHost (tiny MACE
models, float64), on an asyncio loop in a background thread, bound to a free loopback port.

For tests of what the front door alone decides (TLS, tokens, limits, status codes); the served
path through Ray Serve is tested against the session server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from mlipserve.config import BatchingConfig, DeploymentConfig, ModelConfig, ServerConfig
from mlipserve.hosting import ModelHost
from mlipserve.server.frontdoor import FrontDoor
from mlipserve.server.observer import NO_OBSERVER, RequestObserver

# MACE's TorchScript noise at load time (see test_backend_mace.py); for modules that use tiny_host.
MACE_LOAD_WARNING = "ignore:The TorchScript type system doesn't support instance-level annotations"

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mace"
TINY_OPTIONS = {"state_dict": str(FIXTURES / "tiny_mace_untrained.state_dict.pt"),
                "config": str(FIXTURES / "tiny_mace_untrained.config.json"), "dtype": "float64"}
TINY_IDS = ("mace-tiny", "mace-tiny-b")


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="front-door-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine, timeout: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def tiny_host(loop: LoopThread, **batching) -> ModelHost:
    """Two ids of the tiny untrained MACE model (elements H, C, O), loaded and warmed up."""
    configs = tuple(ModelConfig(id=m, backend="mace", options=TINY_OPTIONS, batching=BatchingConfig(**batching))
                    for m in TINY_IDS)

    async def load() -> ModelHost:
        host = ModelHost("mace", configs, DeploymentConfig())
        await host.load_all()
        return host

    return loop.run(load())


@contextlib.contextmanager
def loop_with_tiny_host(**batching) -> Iterator[tuple[LoopThread, ModelHost]]:
    """A LoopThread and tiny_host on it, both closed afterwards (for a module-scoped fixture)."""
    loop = LoopThread()
    host = tiny_host(loop, **batching)
    try:
        yield loop, host
    finally:
        loop.run(host.aclose())
        loop.close()


@contextlib.contextmanager
def running_front_door(loop: LoopThread, host: ModelHost, config: ServerConfig | None = None,
                       observer: RequestObserver = NO_OBSERVER) -> Iterator[FrontDoor]:
    """A FrontDoor over ``host`` on a free port (``config.port`` is ignored), stopped afterwards."""
    import dataclasses

    config = dataclasses.replace(config or ServerConfig(), port=0)
    door = FrontDoor(host, config, observer=observer)
    loop.run(door.start())
    loop.run(door.refresh_health())
    try:
        yield door
    finally:
        loop.run(door.stop(grace=1.0))
