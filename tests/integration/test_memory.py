"""What an idle daemon holds: the lean zygote runs from the start, the one with netlink
(pyroute2) only while bridged sandboxes are being made (and a bridged sandbox works whichever
way it started); the daemon loads no module of a rare path (migrations, the client, the
dashboard's templates) before it takes that path.

Traffic goes only to the addresses of the sandboxes made here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, Daemons, bridge_ports, host_ifname, wait_for

SERVE = "cd /tmp && echo {text} > index.html && exec python3 -m http.server 80"


def command_lines(daemon: Daemon) -> dict[str, list[bytes]]:
    """The daemon's zygotes' command lines by kind: "lean", or "net" (its last argument)."""
    assert daemon.proc is not None
    found = {}
    children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text()
    for pid in children.split():
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except FileNotFoundError:
            continue
        if b"daemon.sandbox.zygote" in words:
            found["net" if words[-1] == b"net" else "lean"] = words
    return found


def zygotes(daemon: Daemon) -> list[str]:
    """The kinds of the daemon's zygotes, sorted."""
    return sorted(command_lines(daemon))


def serves(daemon: Daemon, box: dict[str, Any], text: str) -> bool:
    """The bridged sandbox serves a page on its address, and the host fetches it."""
    daemon.sh(box["id"], SERVE.format(text=text), wait=False)

    def page() -> str | None:
        try:
            response = httpx.get(f"http://{box['network']['ip']}/index.html", timeout=2)
        except httpx.TransportError:
            return None
        return response.text if response.status_code == 200 else None

    return wait_for(page) == f"{text}\n"


def test_the_netlink_zygote_starts_with_the_first_bridged_sandbox_and_stops_when_idle(
    daemons: Daemons,
) -> None:
    daemon = daemons.new("--net-zygote-idle", "1")
    boxes = []
    try:
        assert zygotes(daemon) == ["lean"]
        # A sandbox without a bridge needs no netlink.
        boxes.append(daemon.create())
        assert zygotes(daemon) == ["lean"]
        # The first bridged one starts the netlink zygote, and has its address and link.
        boxes.append(daemon.create(network={"mode": "bridge"}))
        assert zygotes(daemon) == ["lean", "net"]
        assert host_ifname(boxes[-1]["id"]) in bridge_ports(daemon.bridge)
        assert serves(daemon, boxes[-1], "first")
        # Idle for a second: it stops; the sandboxes it made do not notice.
        assert wait_for(lambda: zygotes(daemon) == ["lean"], timeout=15)
        assert serves(daemon, boxes[-1], "again")
        # The next bridged create starts it again.
        boxes.append(daemon.create(network={"mode": "bridge"}))
        assert boxes[-1]["state"] == "running"
        assert serves(daemon, boxes[-1], "second")
    finally:
        for box in boxes:
            daemon.client.delete(f"/sandboxes/{box['id']}")
    assert "stopped the idle zygote of bridged sandboxes" in daemon.log_text()


def test_the_lean_zygote_runs_without_site_packages(daemon: Daemon) -> None:
    """It needs only the standard library and this package: `site` (and its .pth files,
    which may import MiBs of modules) is left out of it, not out of the netlink one."""
    daemon.create(network={"mode": "bridge"})
    try:
        lines = command_lines(daemon)
        assert b"-S" in lines["lean"] and b"-S" not in lines["net"], lines
        assert daemon.sh(daemon.create()["id"], "true")["exit_code"] == 0
    finally:
        daemon.destroy_all()


def test_without_idle_stop_the_netlink_zygote_stays(daemons: Daemons) -> None:
    daemon = daemons.new("--net-zygote-idle", "0")
    box = daemon.create(network={"mode": "bridge"})
    try:
        assert zygotes(daemon) == ["lean", "net"]
        # Creating, and destroying, is long past any idle time a check could wait for.
        assert serves(daemon, box, "kept")
        assert zygotes(daemon) == ["lean", "net"]
    finally:
        daemon.client.delete(f"/sandboxes/{box['id']}")


def imported(daemon: Daemon, after: int = 0) -> set[str]:
    """The modules the daemon imported, from its log past byte `after` (PYTHONPROFILEIMPORTTIME
    writes a line for each to its stderr)."""
    text = daemon.log.read_bytes()[after:].decode(errors="replace")
    return {
        line.rsplit("|", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


# Not click: uvicorn imports it. Not "rich" alone: the import that finds it refused is logged.
RARE = ("alembic", "httpx", "api.client", "jinja2", "rich.traceback")


def test_a_restarted_daemon_loads_no_module_of_a_rare_path(
    daemons: Daemons, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    daemon = daemons.new()
    # A new database is made by Alembic, in a process of its own; the restart finds it current.
    assert {"sqlalchemy", "daemon.store.database"} <= imported(daemon)
    assert "alembic" not in imported(daemon)
    assert (daemon.state_dir / "sandboxd.db").exists()
    daemon.stop()
    restarted = daemon.log.stat().st_size
    daemon.start()
    box = daemon.create()
    assert daemon.sh(box["id"], "true")["exit_code"] == 0
    daemon.client.delete(f"/sandboxes/{box['id']}")
    modules = imported(daemon, restarted)
    assert {"sqlalchemy", "fastapi", "daemon.lifecycle.service"} <= modules  # the profile works
    assert [m for m in RARE if m in modules] == []
    # The dashboard's first visit loads its templates.
    assert daemon.client.get("/ui").status_code == 200
    assert "jinja2" in imported(daemon, restarted)
