"""tests/integration/test_exec.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_exec import *  # noqa: F403
