#!/usr/bin/env bash
# The GPU checks of issue 22, in one script (< 8 min on one H100): the tests marked `cuda` (no host sync on the
# steps that do not log, the first layer and step of a NaN exact on the device, no device memory growth over 500
# steps; fp32 and bf16), then whole-loop ratios on resnet50 (bf16-mixed, batch 256) and GPT-2 small, blocks and every
# leaf, one line per figure. On a machine without a CUDA device it runs what needs none (the tests' collection,
# which skip saying why, and a CPU smoke run of the ratio script) and says that the GPU figures are skipped.
#
#   bash benchmarks/device_check.sh            # from the repository root, with the project's environment active
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
status=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -c "import torch; print('device check on', torch.cuda.get_device_name(), '- torch', torch.__version__)"
    have_gpu=1
else
    echo "device check: no CUDA device (torch.cuda.is_available() is False): the cuda tests skip and the GPU ratios are"
    echo "skipped; running the CPU-only parts"
    have_gpu=0
fi
echo "== tests marked cuda"
start=$(date +%s)
"$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 15
rc=${PIPESTATUS[0]}
if [ "$have_gpu" = 1 ] && [ "$rc" != 0 ]; then status=1; fi
if [ "$have_gpu" = 0 ] && [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=1; fi
echo "(tests: $(( $(date +%s) - start )) s, exit $rc)"
echo "== whole-loop ratios (lit-probe default configuration, plain loop driving ProbeRun)"
start=$(date +%s)
"$PY" benchmarks/device_ratio.py --steps "${STEPS:-120}" || status=1
echo "(ratios: $(( $(date +%s) - start )) s)"
exit $status
