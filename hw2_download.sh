#!/usr/bin/env bash
# Get the trained weights listed in hw2_release.json into checkpoints/, and the hw2 data into ./hw2_data: the course
# archive (needs internet), or the offline toy world.
#
#   bash hw2_download.sh                  # the weights (when hw2_release.json exists), then the course archive
#   bash hw2_download.sh --weights-only   # the weights only: what a fresh clone needs to be graded
#   bash hw2_download.sh --toy            # build the toy world offline (python toy_data.py)
#   bash hw2_download.sh --help           # every option
#
# Each weight file is downloaded beside its destination, its sha256 checked, then renamed into place
# (release_manifest.py). The archive is downloaded and extracted in a temp folder beside the target, its tree is
# checked, and only then is it moved into place. A failure at any step leaves no half-written file, no zip, no
# half-extracted tree, and existing weights and hw2_data untouched.
set -euo pipefail

FILE_ID="1W6Y1OmjzNw2qHoGDCpGOwGpw27wLg1fi"  # Google Drive id of the course's hw2_data.zip
EXPECTED=(digits/mnistm digits/svhn face textual_inversion clip_zeroshot)
TOY_MARKER="TOY"  # written by toy_data.py at the root of a toy world
MANIFEST="hw2_release.json"  # the weights release, at the repository root (hw2_release.py writes it)
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
# Probed (5 s timeout) before downloading so that an offline machine fails at once; empty skips the probe.
NET_CHECK_URL="${HW2_NET_CHECK_URL-https://drive.google.com}"

usage() {
    cat <<EOF
Usage: bash hw2_download.sh [--weights-only | --data-only | --toy] [--force] [--out DIR] [--seed N]

Weights: when $MANIFEST exists (written by python hw2_release.py and committed), download every
trained weight file it lists into its place under checkpoints/ (the P1 model, the textual-inversion
embeddings, Custom Diffusion's weights), each checked against its sha256. A file already present with
the right hash is not downloaded again; a local file that differs is kept unless --force.
Data: download the course archive (gdown id $FILE_ID), check that it holds
${EXPECTED[*]}, and move it to DIR. A complete DIR is kept as it is.
Without options: the weights, then the data.

  --weights-only  Only the weights (what a fresh clone needs to run hw2_1.sh and hw2_3.sh).
  --data-only     Only the data.
  --toy           Build the offline toy world in DIR with toy_data.py instead of the data (never overwrites
                  real data); no weights.
  --force         Data: download again even if DIR is complete; the old DIR is replaced only once the new one
                  is complete. Weights: replace local files that differ from the release.
  --out DIR       Data target folder (default: hw2_data).
  --seed N        Seed of the toy world (default: 0; only with --toy).
  -h, --help      Show this help.

Environment: PYTHON (default python3) runs the weights download, toy_data.py and the archive extraction;
HW2_NET_CHECK_URL (default https://drive.google.com) is probed before downloading the data, empty skips the probe.
EOF
}

die() {
    echo "error: $*" >&2
    exit 1
}

toy=0
force=0
parts="all"  # all, weights or data
out="hw2_data"
seed=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --toy) toy=1 ;;
        --force) force=1 ;;
        --weights-only | --data-only)
            [[ $parts == all ]] || die "--weights-only and --data-only exclude each other"
            parts="${1#--}"
            parts="${parts%-only}"
            ;;
        --out)
            [[ $# -ge 2 && -n "$2" ]] || die "--out needs a folder, e.g. --out hw2_data"
            out="$2"
            shift
            ;;
        --seed)
            [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--seed needs a non-negative integer, e.g. --seed 0"
            seed="$2"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown option '$1': see bash hw2_download.sh --help" ;;
    esac
    shift
done
out="${out%/}"

if [[ $toy -eq 1 ]]; then
    [[ $parts != weights ]] || die "--toy builds the data; it cannot go with --weights-only"
    # toy_data.py builds in a temp folder and swaps it in; it refuses to overwrite a real hw2_data itself
    exec "$PYTHON" "$SCRIPT_DIR/toy_data.py" --out "$out" --seed "$seed"
fi

# The parts of the expected tree that `$1` lacks, one per line.
missing_parts() {
    local part
    for part in "${EXPECTED[@]}"; do
        [[ -d "$1/$part" ]] || echo "$part"
    done
}

# The course archive into $out. A subshell: its temp folder, traps and exits stay its own.
download_data() (
    if [[ -e "$out" ]]; then
        if [[ -f "$out/$TOY_MARKER" ]]; then
            echo "$out is a toy world: it will be replaced by the course data."
        elif [[ -z "$(missing_parts "$out")" && $force -eq 0 ]]; then
            echo "$out is already complete; nothing to do (use --force to download it again)."
            exit 0  # leaves the subshell only
        elif [[ $force -eq 0 ]]; then
            die "$out exists but lacks $(missing_parts "$out" | paste -sd ' '): move it away or rerun with --force"
        fi
    fi

    command -v gdown >/dev/null || die "gdown is not installed: run pip install -r requirements.txt"
    if [[ -n "$NET_CHECK_URL" ]]; then
        "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$NET_CHECK_URL" \
            >/dev/null 2>&1 ||
            die "cannot reach $NET_CHECK_URL (offline?): the course archive needs internet; for the offline toy world run: bash hw2_download.sh --toy"
    fi

    parent="$(dirname "$out")"
    mkdir -p "$parent"
    # beside the target, so that the final move is a rename on the same file system
    work="$(mktemp -d "$parent/.hw2_download.XXXXXX")"
    # On any exit: put the previous data back if the swap below was cut short, then drop the temp folder.
    cleanup() {
        if [[ -d "$work/previous" && ! -e "$out" ]]; then
            mv "$work/previous" "$out"
        fi
        rm -rf "$work"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    gdown "$FILE_ID" -O "$work/hw2_data.zip" ||
        die "downloading the course archive failed (see gdown's message above); nothing was kept"
    "$PYTHON" -m zipfile -e "$work/hw2_data.zip" "$work/extract" 2>"$work/extract.log" ||
        die "cannot extract the downloaded archive ($(tail -n 1 "$work/extract.log")); nothing was kept, try again"
    rm -f "$work/hw2_data.zip"

    # the archive may hold the tree at its top level or inside a hw2_data/ folder
    root="$work/extract"
    [[ -d "$root/hw2_data" ]] && root="$root/hw2_data"
    lacking="$(missing_parts "$root" | paste -sd ' ')"
    [[ -z "$lacking" ]] || die "the downloaded archive lacks $lacking; nothing was kept"

    if [[ -e "$out" ]]; then
        mv "$out" "$work/previous"
        mv "$root" "$out" || die "cannot move the new data to $out; the previous $out was kept"
    else
        mv "$root" "$out"
    fi
    echo "Course data ready in $out."
)

# Every file of the manifest into its destination under checkpoints/, checked against its sha256.
download_weights() {
    if [[ ! -f "$SCRIPT_DIR/$MANIFEST" && $parts == all ]]; then
        echo "No $MANIFEST in $SCRIPT_DIR: no trained weights to download."
        return 0
    fi
    local flags=()
    if [[ $force -eq 1 ]]; then
        flags+=(--force)
    fi
    "$PYTHON" "$SCRIPT_DIR/release_manifest.py" fetch --manifest "$SCRIPT_DIR/$MANIFEST" --root "$SCRIPT_DIR" \
        "${flags[@]}"
}

if [[ $parts != data ]]; then
    download_weights
fi
if [[ $parts != weights ]]; then
    download_data
fi
