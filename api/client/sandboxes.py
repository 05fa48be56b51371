"""Sandboxes from the command line: `run`, `ps`, `inspect`, `logs`, `stats`, `rm`, as their
Docker namesakes behave."""

from __future__ import annotations

import base64
import signal
import sys
import time
from typing import Any

import click
from rich.live import Live
from rich.table import Table

from api.client.base import client, each, examples, no_route
from api.client.execs import run_in
from api.client.render import (
    FORMATS,
    ago,
    as_json,
    exit_status,
    pairs,
    parse_duration,
    parse_size,
    sandbox_exit,
    size,
    stderr,
    stdout,
    table,
)
from api.client.transport import ApiError, Client, image_path, path

RUN_HELP = """Create a sandbox and run CMD in it, as `docker run` does.

Without -d the command's output is printed as it comes and `run` exits with the command's
status; the sandbox stays (exited) until `sandboxd rm`, unless --rm. With -d the sandbox's id
is printed and the command runs on. With no CMD, an --image's entrypoint and cmd run; with
neither, the sandbox just stays up (as with -d) for `sandboxd exec`.

With -i or -t, CMD (default: the image's, else `sh`) runs as an interactive exec in a new
sandbox that has no main command, since only execs have a terminal; --rm removes the sandbox
when it ends. -p implies --network bridge."""


@click.command(
    "run",
    short_help="Create a sandbox and run a command in it",
    help=RUN_HELP,
    epilog=examples(
        "sandboxd run --rm sh -c 'echo hello; uname -a'",
        "sandboxd run -d --name web -p 8080:80 --memory 256m python3 -m http.server 80",
        "sandboxd run -it --rm --image docker.io/library/alpine:3.20",
        "sandboxd run -d --name box --ttl 1h",
    ),
    context_settings={"allow_interspersed_args": False},
)
@click.option("--name", help="A name, unique among sandboxes.")
@click.option("--hostname", help="The host name inside (default: the name).")
@click.option("--image", metavar="REF", help="Start from this image (see `sandboxd images`).")
@click.option("--rootfs", metavar="DIR", help="Start from this host directory tree.")
@click.option("-p", "--publish", multiple=True, metavar="HOST:PORT", help="Publish a port.")
@click.option("--network", type=click.Choice(["none", "bridge", "host"]), help="Network mode.")
@click.option("-v", "--volume", multiple=True, metavar="SRC:DST[:ro]", help="Bind a host path.")
@click.option("--memory", metavar="SIZE", help="Memory limit, e.g. 512m or 1g.")
@click.option("--pids", type=int, help="Most processes at once.")
@click.option("--cpus", type=float, help="CPUs' worth of time, e.g. 0.5.")
@click.option("--disk", metavar="SIZE", help="Disk limit of its writable layer, e.g. 1g.")
@click.option("--ttl", metavar="DURATION", help="Destroyed this long after creation: 90s, 1h.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set a variable (repeatable).")
@click.option("--label", multiple=True, metavar="K=V", help="Set a label (repeatable).")
@click.option("-d", "--detach", is_flag=True, help="Print the id and leave it running.")
@click.option("-i", "--interactive", is_flag=True, help="Pass stdin through (see above).")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal (see above).")
@click.option("--rm", "remove", is_flag=True, help="Remove the sandbox when the command ends.")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def run(**options: Any) -> int:
    api = client()
    cmd = list(options["cmd"]) or _image_command(api, options["image"])
    body = _create_body(options)
    attached = options["interactive"] or options["tty"]
    if attached:
        if options["detach"]:
            raise click.UsageError("-d cannot be used with -i or -t")
        return _run_attached(api, body, cmd or ["sh"], options)
    body["cmd"] = cmd or None
    sandbox = api.post("/sandboxes", body)
    if options["detach"] or not cmd:
        click.echo(sandbox["id"])
        return 0
    status = _follow_to_end(api, sandbox)
    if options["remove"]:
        api.delete(path("sandboxes", sandbox["id"]))
    return status


def _create_body(options: dict[str, Any]) -> dict[str, Any]:
    """POST /sandboxes from the flags; the daemon checks every rule (a 422 says which)."""
    body: dict[str, Any] = {}
    for flag in ("name", "hostname", "image", "rootfs"):
        if options[flag]:
            body[flag] = options[flag]
    ports = [_port(spec) for spec in options["publish"]]
    mode = options["network"] or ("bridge" if ports else None)
    if mode:
        body["network"] = {"mode": mode, "ports": ports} if ports else {"mode": mode}
        if mode == "host":
            body["namespaces"] = ["pid", "mnt", "ipc", "uts", "user"]
    if options["volume"]:
        body["mounts"] = [_mount(spec) for spec in options["volume"]]
    limits: dict[str, Any] = {}
    if options["memory"]:
        limits["memory_bytes"] = parse_size(options["memory"])
    if options["disk"]:
        limits["disk_bytes"] = parse_size(options["disk"])
    if options["pids"] is not None:
        limits["pids"] = options["pids"]
    if options["cpus"] is not None:
        limits["cpus"] = options["cpus"]
    if limits:
        body["limits"] = limits
    if options["ttl"]:
        body["ttl_seconds"] = parse_duration(options["ttl"])
    if env := pairs(options["env"], "--env", from_env=True):
        body["env"] = env
    if labels := pairs(options["label"], "--label"):
        body["labels"] = labels
    return body


def _port(spec: str) -> dict[str, Any]:
    host, _, inside = spec.partition(":")
    inside, _, protocol = (inside or host).partition("/")
    if not (host.isdigit() and inside.isdigit()):
        raise click.BadParameter(f"{spec!r}: expected HOST:PORT", param_hint="--publish")
    return {"host_port": int(host), "sandbox_port": int(inside), "protocol": protocol or "tcp"}


def _mount(spec: str) -> dict[str, Any]:
    source, _, rest = spec.partition(":")
    target, _, mode = rest.partition(":")
    if not (source and target) or mode not in ("", "ro", "rw"):
        raise click.BadParameter(f"{spec!r}: expected SRC:DST[:ro|rw]", param_hint="--volume")
    return {"source": source, "target": target, "read_only": mode != "rw"}


def _image_command(api: Client, image: str | None) -> list[str]:
    """The image's entrypoint and cmd, as `docker run IMAGE` runs them."""
    if not image:
        return []
    config = api.get(image_path(image))["config"]
    return list(config.get("entrypoint") or []) + list(config.get("cmd") or [])


def _run_attached(api: Client, body: dict[str, Any], cmd: list[str], opts: dict[str, Any]) -> int:
    sandbox = api.post("/sandboxes", body)
    try:
        exec_body = {"cmd": cmd}
        return run_in(
            api, sandbox["id"], exec_body, interactive=opts["interactive"], tty=opts["tty"]
        )
    finally:
        if opts["remove"]:
            api.delete(path("sandboxes", sandbox["id"]))


def _follow_to_end(api: Client, sandbox: dict[str, Any]) -> int:
    """The main command's output until it ends (its log, followed); its status."""
    ref = sandbox["id"]
    try:
        _print_logs(api, ref, {"follow": "true"})
    except ApiError as exc:
        if not no_route(exc):
            raise
    while sandbox["state"] in ("creating", "running"):  # the log ends as the command does
        time.sleep(0.2)
        sandbox = api.get(path("sandboxes", ref))
    if sandbox["state"] == "failed" and (end := sandbox.get("exit")):
        stderr().print(f"sandboxd: the sandbox failed: {end.get('message') or end['reason']}")
        return 125 if end.get("reason") == "setup_failed" else exit_status(end) or 125
    return exit_status(sandbox.get("exit"))


def _print_logs(api: Client, ref: str, params: dict[str, str]) -> None:
    """The log's lines as the bytes written (base64 on the wire: the logs route and its
    `encoding` came in the same release)."""
    where = path("sandboxes", ref, "logs")
    with api.stream("GET", where, params={**params, "encoding": "base64"}) as response:
        for event in api.lines(response):
            if "data" in event:
                out = sys.stderr.buffer if event.get("stream") == "stderr" else sys.stdout.buffer
                out.write(base64.b64decode(event["data"]))
                out.flush()


@click.command(
    "logs",
    short_help="Print a sandbox's main-command output",
    help="Print the output of a sandbox's main command (kept until the sandbox is removed).",
    epilog=examples("sandboxd logs web", "sandboxd logs -f --tail 20 web"),
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the command ends.")
@click.option("--tail", type=int, metavar="N", help="Only the last N lines.")
@click.option("--since", metavar="TIME", help="Only output after this RFC 3339 time.")
@click.option("--stream", type=click.Choice(["stdout", "stderr"]), help="Only this stream.")
@click.argument("ref")
def logs(follow: bool, tail: int | None, since: str | None, stream: str | None, ref: str) -> int:
    params = {"follow": "true" if follow else "false"}
    for key, value in (("tail", tail), ("since", since), ("stream", stream)):
        if value is not None:
            params[key] = str(value)
    _print_logs(client(), ref, params)
    return 0


@click.command(
    "ps",
    short_help="List sandboxes",
    help="List running sandboxes (all of them with -a), oldest first.",
    epilog=examples("sandboxd ps", "sandboxd ps -a --label team=ci", "sandboxd ps -aq"),
)
@click.option("-a", "--all", "everything", is_flag=True, help="Also those that have ended.")
@click.option("-q", "--quiet", is_flag=True, help="Only the ids.")
@click.option("--label", multiple=True, metavar="K=V", help="Only those with this label.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def ps(everything: bool, quiet: bool, label: tuple[str, ...], fmt: str) -> int:
    params: list[tuple[str, str]] = [("label", item) for item in label]
    if not everything:
        params.append(("state", "running"))
    items = client().get("/sandboxes", params=params)["items"]
    if fmt == "json":
        as_json(items)
    elif quiet:
        for item in items:
            click.echo(item["id"])
    else:
        table(
            ["ID", "NAME", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS"],
            [_ps_row(item) for item in items],
        )
    return 0


def _ps_row(item: dict[str, Any]) -> list[str]:
    image = (item.get("image") or {}).get("reference") or item.get("rootfs") or "(host)"
    command = " ".join(item.get("cmd") or []) or "-"
    ports = ", ".join(
        f"{p['host_port']}->{p['sandbox_port']}/{p.get('protocol', 'tcp')}"
        for p in (item.get("network") or {}).get("ports") or []
    )
    return [
        item["id"],
        item.get("name") or "",
        image,
        command if len(command) <= 30 else command[:29] + "…",
        ago(item.get("created_at")),
        sandbox_exit(item),
        ports,
    ]


@click.command(
    "inspect",
    short_help="Print sandboxes or images as JSON",
    help="Print sandboxes (or images) as JSON, in an array as `docker inspect` does.",
    epilog=examples("sandboxd inspect web", "sandboxd inspect web | jq '.[0].network.ip'"),
)
@click.argument("refs", nargs=-1, required=True)
def inspect(refs: tuple[str, ...]) -> int:
    api = client()
    found = []
    for ref in refs:
        try:
            found.append(api.get(path("sandboxes", ref)))
        except ApiError as exc:
            if exc.status != 404:
                raise
            try:
                found.append(api.get(image_path(ref)))
            except ApiError:
                raise exc from None
    as_json(found)
    return 0


@click.command(
    "rm",
    short_help="Remove sandboxes",
    help="Remove sandboxes: their processes, files, links and records. A running one only "
    "with -f, as `docker rm` asks.",
    epilog=examples(
        "sandboxd rm web", "sandboxd rm -f web db", "sandboxd rm -f $(sandboxd ps -aq)"
    ),
)
@click.option("-f", "--force", is_flag=True, help="Also running sandboxes (their processes die).")
@click.argument("refs", nargs=-1, required=True)
def rm(force: bool, refs: tuple[str, ...]) -> int:
    api = client()

    def remove(ref: str) -> str:
        if not force and api.get(path("sandboxes", ref))["state"] in ("creating", "running"):
            raise ApiError(409, f"{ref} is running: stop it first, or use rm -f")
        api.delete(path("sandboxes", ref))
        return ref

    return each(refs, remove)


@click.command(
    "stats",
    short_help="Resource use of sandboxes",
    help="Resource use of running sandboxes (or of those named), read from their cgroups.",
    epilog=examples("sandboxd stats", "sandboxd stats --watch web", "sandboxd stats --format json"),
)
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C, with CPU %.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds a refresh.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.argument("refs", nargs=-1)
def stats(watch: bool, interval: float, fmt: str, refs: tuple[str, ...]) -> int:
    api = client()
    if not watch:
        samples = _sample(api, refs)
        if fmt == "json":
            as_json([{"id": s["id"], "name": s["name"], **s["stats"]} for s in samples])
        else:
            stdout().print(_stats_table(samples, {}, 0.0))
        return 0
    # Ctrl-C ends the loop between two samples, never in the middle of a request or a redraw
    # (an exception there could leave a lock of httpx or rich held). The handler only sets a
    # flag: taking a lock in a signal handler can deadlock with the code it interrupted.
    stop: list[bool] = []
    previous = signal.signal(signal.SIGINT, lambda _s, _f: stop.append(True))
    before: dict[str, float] = {}
    last = time.monotonic()
    try:
        with Live(console=stdout(), auto_refresh=False) as live:
            while not stop:
                samples, now = _sample(api, refs), time.monotonic()
                if fmt == "json":
                    as_json([{"id": s["id"], "name": s["name"], **s["stats"]} for s in samples])
                else:
                    live.update(_stats_table(samples, before, now - last), refresh=True)
                before = {s["id"]: s["stats"].get("cpu_seconds") or 0.0 for s in samples}
                last = now
                time.sleep(interval)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def _sample(api: Client, refs: tuple[str, ...]) -> list[dict[str, Any]]:
    sandboxes = (
        [api.get(path("sandboxes", ref)) for ref in refs]
        if refs
        else api.get("/sandboxes", params={"state": "running"})["items"]
    )
    samples = []
    for sandbox in sandboxes:
        try:
            found = api.get(path("sandboxes", sandbox["id"], "stats"))
        except ApiError as exc:
            if refs or exc.status not in (404, 409):  # one named is not running: say so
                raise
            continue  # it ended between the list and its stats
        samples.append({"id": sandbox["id"], "name": sandbox.get("name") or "", "stats": found})
    return samples


def _stats_table(samples: list[dict[str, Any]], before: dict[str, float], span: float) -> Table:
    grid = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header in ("ID", "NAME", "CPU %", "CPU TIME", "MEM", "MEM PEAK", "PIDS", "OOM KILLS"):
        grid.add_column(header)
    for sample in samples:
        numbers = sample["stats"]
        cpu = numbers.get("cpu_seconds")
        percent = "-"
        if cpu is not None and sample["id"] in before and span > 0:
            percent = f"{100 * (cpu - before[sample['id']]) / span:.1f}%"
        grid.add_row(
            sample["id"],
            sample["name"],
            percent,
            "-" if cpu is None else f"{cpu:.2f}s",
            size(numbers.get("memory_current_bytes")),
            size(numbers.get("memory_peak_bytes")),
            str(numbers.get("pids_current") if numbers.get("pids_current") is not None else "-"),
            str(numbers.get("oom_kills") if numbers.get("oom_kills") is not None else "-"),
        )
    return grid
