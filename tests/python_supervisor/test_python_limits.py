"""tests/integration/test_limits.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_limits import *  # noqa: F403
