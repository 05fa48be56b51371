"""tests/integration/test_exec_bytes.py again, with the Python supervisor as PID 1
(the native one is the default)."""

from tests.integration.test_exec_bytes import *  # noqa: F403
