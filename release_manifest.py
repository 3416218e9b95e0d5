"""The weights release manifest `hw2_release.json` and the download of the files it lists (standard library only).

    python release_manifest.py fetch              # what `bash hw2_download.sh --weights-only` runs
    python release_manifest.py fetch --force      # also replace local files that differ from the release

`hw2_release.py` writes the manifest; a fresh clone fetches every listed file into its destination under
`checkpoints/`. A file is downloaded into a temp file beside its destination, its size and sha256 are checked
against the manifest, and only then is it renamed into place: a wrong hash, an HTTP error or an unreachable host
is one `error: ...` line and exit status 1, with nothing half-written and no existing file replaced. A file already
present with the right hash is not downloaded again. A plain http(s) URL is read with urllib; a Google Drive share
link or bare file id is fetched with `gdown`, as the course's own scripts fetch their data.

This module imports nothing beyond the standard library, so that the download starts at once (the other scripts
import torch, which takes seconds).
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent
MANIFEST_NAME = "hw2_release.json"  # at the repository root, committed
MANIFEST_VERSION = 1
DESTINATION_ROOT = "checkpoints"  # every destination lies under it: the grading scripts look there
FIELDS = ("name", "destination", "url", "sha256", "bytes")
DRIVE_ID = re.compile(r"[A-Za-z0-9_-]{20,}")  # a bare Google Drive file id (they are 28-44 characters)
DRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
TIMEOUT_S = 30  # per connection attempt and per read: a dead host fails in seconds, a slow one keeps going
CHUNK = 1 << 20


class ReleaseError(Exception):
    """A problem with the manifest or a download, reported as one `error: ...` line."""


# ---------------------------------------------------------------------------------------------- the manifest


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def drive_url(link_or_id):
    """A Google Drive share link as given, or a bare file id as the link gdown reads."""
    if DRIVE_ID.fullmatch(link_or_id):
        return f"https://drive.google.com/uc?id={link_or_id}"
    if not is_drive(link_or_id):
        raise ReleaseError(f"{link_or_id!r} is neither a Google Drive link (https://drive.google.com/...) nor a "
                           f"Drive file id")
    return link_or_id


def is_drive(url):
    return urllib.parse.urlsplit(url).hostname in DRIVE_HOSTS


def check_entry(entry, source):
    """A manifest entry must name a file and a destination under checkpoints/, and carry its sha256 and size."""
    if not isinstance(entry, dict) or any(field not in entry for field in FIELDS):
        raise ReleaseError(f"{source}: every file entry needs the fields {', '.join(FIELDS)}; got {entry!r}")
    destination = Path(entry["destination"])
    if (destination.is_absolute() or ".." in destination.parts or len(destination.parts) < 2
            or destination.parts[0] != DESTINATION_ROOT):
        raise ReleaseError(f"{source}: destination {entry['destination']!r} must lie under {DESTINATION_ROOT}/ "
                           f"(a relative path without '..')")
    if not re.fullmatch(r"[0-9a-f]{64}", str(entry["sha256"])) or not isinstance(entry["bytes"], int):
        raise ReleaseError(f"{source}: {entry['name']} needs a 64-hex-digit sha256 and an integer size")


def read_manifest(path):
    """The manifest's file entries, checked; any defect is a ReleaseError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ReleaseError(f"no {path.name} in {path.parent}: this repository has no released weights (make a "
                           f"release with python hw2_release.py)") from err
    except (OSError, ValueError) as err:
        raise ReleaseError(f"cannot read {path} ({err}); restore it with git checkout {path.name}") from err
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("files"), list):
        raise ReleaseError(f"{path} is not a version-{MANIFEST_VERSION} hw2 release manifest (written by "
                           f"hw2_release.py)")
    for entry in data["files"]:
        check_entry(entry, path)
    return data["files"]


def manifest_text(files):
    """The manifest as written: stable key order and indentation, so an unchanged release gives no diff."""
    return json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=2) + "\n"


# ------------------------------------------------------------------------------------------------- download


def file_mode():
    """The mode of a new file under the current umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def download_url(url, target):
    """Stream `url` into the open binary file `target` (urllib); errors become one-line ReleaseErrors."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            shutil.copyfileobj(response, target, CHUNK)
    except urllib.error.HTTPError as err:
        raise ReleaseError(f"HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise ReleaseError(f"cannot reach the host: {err.reason}") from err
    except (OSError, ValueError) as err:  # timeouts, resets, malformed URLs
        raise ReleaseError(f"{type(err).__name__}: {err}") from err


def download_drive(url, target_path):
    """Fetch a Google Drive link or id with gdown's command line into `target_path`."""
    gdown = shutil.which("gdown")
    if gdown is None:
        raise ReleaseError("gdown is not installed (pip install -r requirements.txt)")
    result = subprocess.run([gdown, url, "-O", str(target_path), "-q"], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise ReleaseError(f"gdown failed: {lines[-1] if lines else f'exit status {result.returncode}'}")


@contextlib.contextmanager
def new_folders(folder):
    """Create `folder` and its missing parents; remove the ones created here again if the block fails."""
    created = []
    for parent in reversed([folder, *folder.parents]):
        if not parent.exists():
            created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def local_state(path, entry):
    """"release" when `path` holds the released file, "source" when it holds the file the release was made from
    (a P1 training checkpoint, which samples the same images), "other" when it holds something else, None if absent."""
    if not path.exists():
        return None
    digest = sha256_file(path) if path.is_file() else None
    if digest == entry["sha256"]:
        return "release"
    return "source" if digest is not None and digest == entry.get("source_sha256") else "other"


def fetch(entry, root, force=False):
    """Make `root/destination` the file the manifest describes (or the file it was made from); returns "present",
    "source", "downloaded" or "replaced"."""
    path = Path(root) / entry["destination"]
    state = local_state(path, entry)
    if state in ("release", "source"):
        return "present" if state == "release" else "source"
    if state == "other" and not force:
        raise ReleaseError(f"{entry['destination']} exists and differs from the release: move it away, or rerun "
                           f"with --force to replace it")
    url = entry["url"]
    if not url:
        raise ReleaseError(f"{MANIFEST_NAME} gives no URL for {entry['name']}: upload it and run hw2_release.py "
                           f"with --url-base or --drive")
    print(f"{entry['destination']}: downloading {entry['bytes'] / 1e6:.1f} MB from {url} ...", flush=True)
    with new_folders(path.parent):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            try:
                with os.fdopen(fd, "wb") as target:
                    if not is_drive(url):
                        download_url(url, target)
                if is_drive(url):
                    download_drive(url, tmp)
            except ReleaseError as err:
                raise ReleaseError(f"cannot download {entry['name']} from {url} ({err}); nothing was written") from None
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            size, digest = os.path.getsize(tmp), sha256_file(tmp)
            if digest != entry["sha256"] or size != entry["bytes"]:
                raise ReleaseError(f"{entry['name']} from {url} has sha256 {digest} ({size} bytes) where "
                                   f"{MANIFEST_NAME} expects {entry['sha256']} ({entry['bytes']} bytes): the upload "
                                   f"does not match the release; nothing was written")
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return "replaced" if state == "other" else "downloaded"


OUTCOMES = {"present": "already present, sha256 ok", "source": "kept: the checkpoint this release was made from",
            "downloaded": "downloaded, sha256 ok", "replaced": "replaced by the release (--force), sha256 ok"}


def fetch_all(manifest, root, force=False):
    """Fetch every file of `manifest` into `root`, one line each; stops at the first failure."""
    files = read_manifest(manifest)
    outcomes = []
    for entry in files:
        outcomes.append(fetch(entry, root, force))
        print(f"{entry['destination']} ({entry['bytes'] / 1e6:.1f} MB): {OUTCOMES[outcomes[-1]]}", flush=True)
    fetched = sum(outcome in ("downloaded", "replaced") for outcome in outcomes)
    print(f"Weights ready: {len(files)} file(s) of {Path(manifest).name}, {fetched} downloaded.")
    return outcomes


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        fetch_all(Path(args.manifest), Path(args.root), args.force)
    except ReleaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="Download every file the manifest lists into its destination.")
    fetch_parser.add_argument("--manifest", default=str(REPO / MANIFEST_NAME),
                              help=f"The manifest (default: {MANIFEST_NAME} in this repository).")
    fetch_parser.add_argument("--root", default=str(REPO),
                              help="Folder the destinations are relative to (default: this repository).")
    fetch_parser.add_argument("--force", action="store_true",
                              help="Replace a local file that differs from the release (after the download checked).")
    return parser


if __name__ == "__main__":
    sys.exit(main())
