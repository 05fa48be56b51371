"""systemd's readiness protocol (sd_notify(3)): tell the service manager READY=1 once the daemon
serves, and STOPPING=1 when it begins to stop.

Runs in: the daemon process. The protocol is one datagram of `KEY=VALUE` lines sent to the
unix socket named by $NOTIFY_SOCKET (a path, or an abstract name written with a leading '@').
Without $NOTIFY_SOCKET (not started by systemd, or not Type=notify) every call does nothing.
A failed send is logged and otherwise ignored: the daemon serves either way.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENVIRONMENT = "NOTIFY_SOCKET"


class Notifier:
    def __init__(self, address: str | None) -> None:
        self.address = _sockaddr(address) if address else None
        if address and self.address is None:
            log.warning(
                "%s=%s: not a unix socket; systemd will not hear from us", ENVIRONMENT, address
            )

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier of $NOTIFY_SOCKET, taken out of the environment: the zygotes,
        supervisors and sandboxes started later must not be able to speak for the daemon."""
        return cls(os.environ.pop(ENVIRONMENT, None))

    def notify(self, *fields: str) -> None:
        """Send `fields` (e.g. "READY=1") as one message."""
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd (%s): %s", ", ".join(fields), exc)


def _sockaddr(address: str) -> str | bytes | None:
    if address.startswith("@"):  # the abstract namespace: a leading NUL byte on the wire
        return b"\0" + address[1:].encode()
    if address.startswith("/"):
        return address
    return None  # vsock: and others, which a daemon on the host itself does not need
