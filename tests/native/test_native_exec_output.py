"""tests/integration/test_exec_output.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_exec_output import *  # noqa: F403
