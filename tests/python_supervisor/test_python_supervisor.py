"""tests/integration/test_supervisor.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_supervisor import *  # noqa: F403
