import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import TEST_POLICY, TEST_SERVICES, write_blocklists  # noqa: E402


@pytest.fixture
def blocklists(tmp_path):
    """A small test blocklists directory (see helpers.TEST_POLICY / TEST_SERVICES)."""
    return write_blocklists(tmp_path / "blocklists", TEST_POLICY, TEST_SERVICES)
