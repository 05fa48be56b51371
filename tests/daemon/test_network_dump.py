"""daemon.network.bridge.dump: a netlink dump the kernel marks interrupted (a link or route changed
meanwhile: NLM_F_DUMP_INTR) is taken again, so a busy host cannot stop the daemon's start.
The real dump runs against this host's links."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from daemon.network.bridge import dump


def test_a_real_dump_lists_the_hosts_links() -> None:
    async def links() -> list[str]:
        async with AsyncIPRoute() as ipr:
            return [link.get("ifname") for link in await dump(lambda: ipr.link("dump"))]

    names = asyncio.run(links())
    assert "lo" in names and len(names) == len(set(names))


def interrupted_then(messages: list[Any], interruptions: int) -> Any:
    calls = {"n": 0}

    async def request() -> AsyncIterator[Any]:
        calls["n"] += 1
        broken = calls["n"] <= interruptions

        async def messages_() -> AsyncIterator[Any]:
            for message in messages:
                yield message
            if broken:
                raise NetlinkDumpInterrupted()

        return messages_()

    return request, calls


def test_an_interrupted_dump_is_taken_again() -> None:
    request, calls = interrupted_then(["a", "b"], interruptions=2)
    assert asyncio.run(dump(request)) == ["a", "b"]
    assert calls["n"] == 3


def test_a_dump_interrupted_every_time_fails_in_the_end() -> None:
    request, calls = interrupted_then(["a"], interruptions=100)
    with pytest.raises(NetlinkDumpInterrupted):
        asyncio.run(dump(request))
    assert calls["n"] == 5
