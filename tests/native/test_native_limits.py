"""tests/integration/test_limits.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_limits import *  # noqa: F403
