"""tests/integration/test_logs.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_logs import *  # noqa: F403
