"""tests/integration/test_attach.py against sandboxes whose PID 1 is the native one."""

from tests.integration.test_attach import *  # noqa: F403
