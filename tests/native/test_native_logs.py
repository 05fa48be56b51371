"""tests/integration/test_logs.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_logs import *  # noqa: F403
