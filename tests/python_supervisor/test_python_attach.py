"""tests/integration/test_attach.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_attach import *  # noqa: F403
