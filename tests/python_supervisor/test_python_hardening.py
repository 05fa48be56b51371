"""tests/integration/test_hardening.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_hardening import *  # noqa: F403
