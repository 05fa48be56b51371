"""tests/integration/test_exec_bytes.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_exec_bytes import *  # noqa: F403
