"""tests/integration/test_exec_control.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_exec_control import *  # noqa: F403
