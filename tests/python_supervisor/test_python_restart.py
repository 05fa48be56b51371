"""tests/integration/test_restart.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_restart import *  # noqa: F403
