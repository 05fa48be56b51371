"""One router per resource: system, sandboxes, execs."""
