"""Shared test setup: the repository root on sys.path, and the optional real data in ../shared/data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = Path(os.environ.get('D2V_SHARED_DATA', ROOT.parent / 'shared' / 'data'))


@pytest.fixture
def shared_data():
    """../shared/data (or $D2V_SHARED_DATA); the test is skipped where it is absent, as in a user's fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'{SHARED_DATA} is absent')
    return SHARED_DATA
