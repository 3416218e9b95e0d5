#!/usr/bin/env bash
# P1, as the course grades it: 500 MNIST-M and 500 SVHN digits (50 per digit) from the repository's checkpoint.
#
#   bash hw2_1.sh OUT_DIR      # -> OUT_DIR/mnistm/0_001.png .. 9_050.png and OUT_DIR/svhn/ likewise
#
# Samples with p1_inference.py's defaults (DPM-Solver++, 10 steps, the checkpoint's guidance weight, seed 0)
# from the newest checkpoints/p1/ddpm*.safetensors beside this script, whatever the current folder. Flags after
# OUT_DIR go to p1_inference.py (see its --help). PYTHON (default python3) runs it.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: bash hw2_1.sh OUT_DIR [p1_inference.py flags]" >&2
    exit 1
fi
exec "${PYTHON:-python3}" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/p1_inference.py" "$@"
