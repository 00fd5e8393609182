"""The watch on the client while a call awaits its upstream (CallPipeline._forward), in the
orderings one loop turn can bring: a hang-up, a shutdown's cancel, the upstream's answer."""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import pytest

from proxy import calls
from proxy.errors import ClientClosed
from proxy.occasional import Occasional

CALL = types.SimpleNamespace(group=types.SimpleNamespace(models=["m"]), stream=False, deadline=0.0)


class Client:
    """An ASGI receive whose connection the test can drop."""

    def __init__(self) -> None:
        self.gone = False
        self._event = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if not self.gone:
            await self._event.wait()
        return {"type": "http.disconnect"}

    def hang_up(self) -> None:
        self.gone = True
        self._event.set()


async def run(monkeypatch: pytest.MonkeyPatch, *steps: str) -> tuple[str, Any]:
    """What the request's task ends with when `steps` happen in one turn of the loop."""
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def forward(*args: Any) -> str:
        return await answer

    monkeypatch.setattr(calls, "forward", forward)
    pipeline = calls.CallPipeline.__new__(calls.CallPipeline)
    pipeline._upstream = None  # type: ignore[assignment]
    # What an answered call looks at on its way back: the faults of LiteLLM said, and of groups.
    pipeline._unreachable = pipeline._key_refused = pipeline._out_of_files = Occasional(
        logging.getLogger("tollgate.test"), logging.WARNING
    )
    pipeline._failing_groups = {}
    pipeline._failing_models = {}
    monkeypatch.setattr(pipeline, "payload", lambda call: {})
    client = Client()

    async def request() -> tuple[str, Any]:
        try:
            return "answered", await pipeline._forward(CALL, client.receive)  # type: ignore[arg-type]
        except ClientClosed:
            await asyncio.sleep(0.01)  # as the call is recorded: a cancel left standing lands here
            return "client closed", asyncio.current_task().cancelling()  # type: ignore[union-attr]

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    for step in steps:
        {"hang up": client.hang_up, "shut down": task.cancel, "answer": lambda: answer.set_result("the answer")}[step]()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled", None


def test_a_hang_up_while_the_upstream_is_awaited_ends_the_call_as_client_closed(monkeypatch):
    assert asyncio.run(run(monkeypatch, "hang up")) == ("client closed", 0)


@pytest.mark.parametrize("steps", [("shut down",), ("hang up", "shut down"), ("shut down", "hang up")])
def test_a_shutdown_cancel_stands_even_with_a_hang_up_in_the_same_turn(monkeypatch, steps):
    assert asyncio.run(run(monkeypatch, *steps)) == ("cancelled", None)


def test_an_answer_that_came_before_the_hang_up_is_returned(monkeypatch):
    assert asyncio.run(run(monkeypatch, "answer", "hang up")) == ("answered", "the answer")


def test_a_hang_up_that_came_before_the_answer_wins(monkeypatch):
    assert asyncio.run(run(monkeypatch, "hang up", "answer")) == ("client closed", 0)
