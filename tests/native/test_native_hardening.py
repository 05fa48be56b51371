"""tests/integration/test_hardening.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_hardening import *  # noqa: F403
