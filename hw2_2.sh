#!/usr/bin/env bash
# P2, as the course grades it: DDIM (50 steps, eta 0) from the course's noises with its face UNet.
#
#   bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT    # NOISE_DIR/00.pt, 01.pt, ... -> OUT_DIR/00.png, 01.png, ...
#
# Runs p2_ddim.py beside this script, whatever the current folder; PYTHON (default python3) runs it.
set -euo pipefail
if [[ $# -ne 3 ]]; then
    echo "usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT" >&2
    exit 1
fi
exec "${PYTHON:-python3}" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/p2_ddim.py" "$1" "$2" "$3"
