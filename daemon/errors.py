"""The one error hierarchy of sandboxd: each error knows its HTTP status and title.

Lower layers raise OSError, NetlinkError or SQLAlchemy errors; the daemon translates them at
its boundary with `raise SandboxError(...) from exc`, and api/ maps SandboxError to
problem+json in a single handler.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every error the daemon reports to a client."""

    status = 500
    title = "Internal error"
    slug = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(SandboxError):
    status = 404
    title = "Not found"
    slug = "not-found"


class Conflict(SandboxError):
    status = 409
    title = "Conflict"
    slug = "conflict"


class InvalidTransition(Conflict):
    """A lifecycle transition the state machine does not allow."""

    title = "Invalid state transition"
    slug = "invalid-transition"


class Invalid(SandboxError):
    """Input that is well-formed JSON but breaks a rule the schema cannot express."""

    status = 422
    title = "Invalid request"
    slug = "invalid"


class LimitReached(SandboxError):
    status = 503
    title = "Sandbox limit reached"
    slug = "limit-reached"


class LeasesHeld(LimitReached):
    """Every uid range (or bridge address) is held, some perhaps by sandboxes whose removal
    has not let theirs go yet: a create may wait for those removals before it says so."""


class SetupFailed(SandboxError):
    """The kernel refused a step of building a sandbox; the sandbox is left `failed`."""

    title = "Sandbox setup failed"
    slug = "setup-failed"


class SupervisorUnresponsive(SandboxError):
    """A sandbox's supervisor did not answer within `supervisor_timeout`, or has not read
    what was sent to it: stopped (SIGSTOP), or too busy. The sandbox is left as it is."""

    status = 504
    title = "Supervisor unresponsive"
    slug = "supervisor-unresponsive"


class InsufficientStorage(SandboxError):
    """A write would take the sandbox past its disk limit (ENOSPC or EDQUOT inside)."""

    status = 507
    title = "Insufficient storage"
    slug = "insufficient-storage"


class RegistryError(SandboxError):
    """A registry refused a pull, was unreachable, or sent what its digests do not match."""

    status = 502
    title = "Registry error"
    slug = "registry"
