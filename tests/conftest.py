import inspect
import os
import re
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


# -- tiers: a test that never runs a whole command is a unit test (``-m unit``: seconds) ------------------
PIPELINE_CALLS = re.compile(r"\b(compress|search|main|validate_models|run_search|subprocess\.\w+|_cli|run_cli)\(")


def _runs_the_pipeline(module) -> set[str]:
    """Names of the module's functions that run a whole command, directly or through another such function."""
    sources = {}
    for name, obj in vars(module).items():
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            try:
                sources[name] = inspect.getsource(inspect.unwrap(obj))
            except (OSError, TypeError):
                sources[name] = ""
    heavy = {name for name, text in sources.items() if PIPELINE_CALLS.search(text)}
    while True:
        more = {name for name, text in sources.items() if name not in heavy
                and any(re.search(rf"\b{re.escape(h)}\(", text) for h in heavy)}
        if not more:
            return heavy
        heavy |= more


def pytest_collection_modifyitems(config, items):
    heavy_by_module: dict[str, set[str]] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None or item.get_closest_marker("testbed") or item.get_closest_marker("slow"):
            continue
        if module.__name__ not in heavy_by_module:
            heavy_by_module[module.__name__] = _runs_the_pipeline(module)
        if item.originalname not in heavy_by_module[module.__name__]:
            item.add_marker(pytest.mark.unit)
