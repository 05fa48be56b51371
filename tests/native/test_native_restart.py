"""tests/integration/test_restart.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_restart import *  # noqa: F403
