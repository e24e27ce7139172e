"""The reports' content: the typed reports of ``compress`` and ``validate`` (``schema.py``) assembled from
what the stages returned (``markdown.py`` renders them)."""

from __future__ import annotations

import resource
import time

from ..onnxio.load import LoadedModel
from .schema import Calibration, CompressReport, LayerRow, ModelFile, Timing, Totals, ValidateReport


def compress_report(loaded: LoadedModel, config, validate_config, digest: str, calib, plan_report: dict, solved,
                    declined: list, validation, notes: list[str], started: float, solve_seconds: float
                    ) -> CompressReport:
    """The ``compress`` report; ``started`` is the run's ``perf_counter`` start."""
    rows = [LayerRow.of(o) for o in solved.outcomes]
    reduction = validation.original.nonzero_layer_weights / max(validation.compressed.nonzero_layer_weights, 1)
    timing = Timing(time.perf_counter() - started, peak_rss_mb(), solve_seconds, solved.peak_cache_bytes / 2**20,
                    solved.spilled_bytes / 2**20)
    return CompressReport(
        input=ModelFile.of(loaded), config=config, validate_config=validate_config, config_sha256=digest,
        calibration=Calibration(calib.source, calib.num_samples, calib.representative), plan=plan_report,
        layers=rows, refined_blocks=list(solved.refined), distillation=solved.distilled, declined=list(declined),
        totals=Totals.of(rows, len(declined), reduction), validation=validation, timing=timing, notes=notes,
        passed=validation.passed)


def validate_report(original: LoadedModel, compressed: LoadedModel, config, validation, started: float
                    ) -> ValidateReport:
    """The ``validate`` report; ``started`` is the run's ``perf_counter`` start."""
    return ValidateReport(ModelFile.of(original), ModelFile.of(compressed), config, validation,
                          Timing(time.perf_counter() - started, peak_rss_mb()), validation.passed)


def peak_rss_mb() -> float:
    """Peak resident memory of this program so far: Linux's VmHWM, which starts at exec (``ru_maxrss`` also keeps
    the peak of the process that forked it: a CI runner or a test holding gigabytes), else ``ru_maxrss`` (KiB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
