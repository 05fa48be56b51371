"""The daemon's settings: one frozen dataclass, filled from flags, environment and a TOML file.

Precedence, as the contract fixes it: a flag overrides the environment, which overrides the
configuration file, which overrides the defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SOCKET = "unix:///run/sandboxd/sandboxd.sock"


@dataclass(frozen=True)
class Config:
    listen: list[str] = field(default_factory=lambda: [DEFAULT_SOCKET])
    state_dir: Path = Path("/var/lib/sandboxd")
    run_dir: Path = Path("/run/sandboxd")
    token: str | None = None
    max_sandboxes: int = 1000
    output_limit: int = 1024 * 1024
    max_body: int = 1024 * 1024
    # First host uid of the ranges given to sandboxes' user namespaces: each live sandbox
    # owns [uid_base + slot * 65536, +65536). Far above the usual /etc/subuid ranges.
    uid_base: int = 1_000_000_000
