"""tests/integration/test_exec_output.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_exec_output import *  # noqa: F403
