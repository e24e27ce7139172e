#!/usr/bin/env sh
# Compress, validate with gates on held-out data, optionally check on aarch64; fail the job on a missed gate.
#
#   ONNXADMM_MODEL=model.onnx ONNXADMM_CALIB=calib.npz ONNXADMM_VAL=val.npz sh scripts/ci_compress.sh
#
# Settings (environment): ONNXADMM_GATES, the budget (default "--max-accuracy-drop 1.0"); ONNXADMM_ARGS, more
# compress flags (default none: the search picks the fastest model within the budget; "--objective size" for
# the smallest, "--time-budget-min 30" to bound it, or a --method to skip the search); ONNXADMM_OUT (default:
# <model>.compressed.onnx); ONNXADMM_LABELS (default labels); ONNXADMM_ARM=1 to add the aarch64 check (qemu;
# root for the one-time setup).
# Exit status: 0 all gates hold, 1 a gate failed (model and reports still written), 2 usage, 3 bad input.
# With GITHUB_STEP_SUMMARY set, the Markdown reports are appended to the job summary.
set -u
MODEL=${ONNXADMM_MODEL:?set ONNXADMM_MODEL to the .onnx to compress}
CALIB=${ONNXADMM_CALIB:?set ONNXADMM_CALIB to the calibration .npz}
VAL=${ONNXADMM_VAL:?set ONNXADMM_VAL to the held-out .npz with labels}
OUT=${ONNXADMM_OUT:-${MODEL%.onnx}.compressed.onnx}
ARGS=${ONNXADMM_ARGS:-}
GATES=${ONNXADMM_GATES:---max-accuracy-drop 1.0}
LABELS=${ONNXADMM_LABELS:-labels}
PLATFORM=""
[ "${ONNXADMM_ARM:-0}" = "1" ] && PLATFORM="--platform linux-aarch64"

summary() {
  [ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ -f "$1" ] && cat "$1" >> "$GITHUB_STEP_SUMMARY"
  return 0
}

onnxadmm check "$MODEL" || exit $?
# shellcheck disable=SC2086  # ARGS and GATES are flag lists
onnxadmm compress "$MODEL" "$OUT" --calib "$CALIB" --val "$VAL" --labels "$LABELS" $ARGS $GATES \
  --report "$OUT.compress.json"
compress_status=$?
summary "$OUT.compress.md"
[ $compress_status -gt 1 ] && exit $compress_status
# shellcheck disable=SC2086
onnxadmm validate "$MODEL" "$OUT" --data "$VAL" --labels "$LABELS" $GATES $PLATFORM --report "$OUT.validate.json"
validate_status=$?
summary "$OUT.validate.md"
[ $validate_status -ne 0 ] && exit $validate_status
exit $compress_status
