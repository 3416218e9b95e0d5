#!/usr/bin/env bash
# P3 grading: the course grader's call. Generates 25 images per concept and prompt of INPUT_JSON with Stable
# Diffusion v1.4 and the textual-inversion embeddings learned into checkpoints/p3_ti/ (see docs/p3.md).
#
#   bash hw2_3.sh INPUT_JSON OUTPUT_DIR SD_CHECKPOINT [generate flags...]
#   bash hw2_3.sh hw2_data/textual_inversion/input.json output_folder \
#       stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt
#
# Writes OUTPUT_DIR/{concept}/{prompt}/source{concept}_prompt{prompt}_{i}.png. Works from any working folder;
# relative paths are taken from the caller's. Extra arguments go to `p3_textual_inversion.py generate`
# (e.g. --steps 50). HW2_P3_EMBEDS overrides the embeddings folder, PYTHON the interpreter.
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: bash hw2_3.sh INPUT_JSON OUTPUT_DIR SD_CHECKPOINT [generate flags...]" >&2
    exit 2
fi
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EMBEDS="${HW2_P3_EMBEDS:-$SCRIPT_DIR/checkpoints/p3_ti}"
exec "${PYTHON:-python3}" "$SCRIPT_DIR/p3_textual_inversion.py" generate "$1" "$2" "$3" --embeds "$EMBEDS" "${@:4}"
