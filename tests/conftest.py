import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
TESTBED = ROOT.parent / "shared" / "testbed"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def needs_testbed():
    return pytest.mark.skipif(not (TESTBED / "manifest.json").is_file(),
                              reason=f"test-bed not found at {TESTBED} (../shared/testbed)")
