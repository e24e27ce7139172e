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


@pytest.fixture(autouse=True)
def latency_cache(request, tmp_path_factory, monkeypatch):
    """Every test starts with an empty onnxadmm cache of its own (``$XDG_CACHE_HOME``; per-shape timings are
    cached there), so no test depends on what ran before it. The ``arm`` cases keep the user's cache, where
    the emulated aarch64 environment is built once."""
    if request.node.get_closest_marker("arm"):
        yield None
        return
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    yield folder
