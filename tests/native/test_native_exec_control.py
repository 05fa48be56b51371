"""tests/integration/test_exec_control.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_exec_control import *  # noqa: F403
