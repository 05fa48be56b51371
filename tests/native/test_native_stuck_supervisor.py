"""tests/integration/test_stuck_supervisor.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_stuck_supervisor import *  # noqa: F403
