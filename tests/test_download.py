"""hw2_download.sh: offline failures are one clear line and leave nothing behind; the archive is checked and
swapped in whole (fed by a stand-in gdown that copies a local zip); --toy builds or refuses like toy_data.py.

The network is never used: the reachability probe is pointed at a closed local port, or skipped while a
stand-in `gdown` earlier on PATH serves the archive. The data tests pass --data-only, so that a committed
hw2_release.json (whose weights nothing here serves) changes none of them."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from utils import TOY_MARKER

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "hw2_download.sh"
PARTS = ["digits/mnistm", "digits/svhn", "face", "textual_inversion", "clip_zeroshot"]
CLOSED_PORT_URL = "http://127.0.0.1:9/"  # the discard port: refused at once, like a machine without network

FAKE_GDOWN = """#!/usr/bin/env bash
# stand-in for gdown: copy $FAKE_ARCHIVE to the -O target; with $FAKE_FAIL, leave half a file and fail
while [[ $# -gt 0 ]]; do
    if [[ $1 == -O ]]; then
        if [[ -n "${FAKE_FAIL:-}" ]]; then head -c 100 "$FAKE_ARCHIVE" > "$2"; echo "connection reset" >&2; exit 1; fi
        cp "$FAKE_ARCHIVE" "$2"; exit 0
    fi
    shift
done
exit 2
"""


def run(args, cwd, **env):
    full_env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def assert_one_error_line(result, *fragments):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert result.stderr.splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def make_archive(path, parts=PARTS, top="hw2_data/"):
    with zipfile.ZipFile(path, "w") as archive:
        for part in parts:
            archive.writestr(f"{top}{part}/file.txt", f"real {part}")
    return path


@pytest.fixture
def fake_gdown(tmp_path):
    """PATH and environment under which `gdown` serves a local archive (tmp_path/served/hw2_data.zip)."""
    folder = tmp_path / "served"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "gdown").write_text(FAKE_GDOWN)
    (folder / "bin" / "gdown").chmod(0o755)
    return {"PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}", "HW2_NET_CHECK_URL": "",
            "FAKE_ARCHIVE": str(folder / "hw2_data.zip")}


@pytest.fixture
def work(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def test_offline_fails_clearly_and_leaves_nothing(work):
    result = run(["--data-only"], work, HW2_NET_CHECK_URL=CLOSED_PORT_URL)
    assert_one_error_line(result, "cannot reach", "--toy")
    assert listing(work) == []


def test_failed_download_leaves_nothing(work, fake_gdown):
    make_archive(fake_gdown["FAKE_ARCHIVE"])
    result = run(["--data-only"], work, **fake_gdown, FAKE_FAIL="1")
    assert_one_error_line(result, "downloading the course archive failed")
    assert listing(work) == []


@pytest.mark.parametrize("top", ["hw2_data/", ""])
def test_download_extracts_checks_and_moves(work, fake_gdown, top):
    make_archive(fake_gdown["FAKE_ARCHIVE"], top=top)
    result = run(["--data-only", "--out", "data/hw2_data"], work, **fake_gdown)
    assert result.returncode == 0, result.stderr
    assert listing(work / "data") == sorted(["hw2_data", "hw2_data/digits"] + [f"hw2_data/{p}" for p in PARTS]
                                            + [f"hw2_data/{p}/file.txt" for p in PARTS])


def test_incomplete_or_corrupt_archive_is_refused(work, fake_gdown):
    make_archive(fake_gdown["FAKE_ARCHIVE"], parts=PARTS[:-1])
    assert_one_error_line(run(["--data-only"], work, **fake_gdown), "lacks clip_zeroshot")
    assert listing(work) == []
    with open(fake_gdown["FAKE_ARCHIVE"], "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    assert_one_error_line(run(["--data-only"], work, **fake_gdown), "cannot extract")
    assert listing(work) == []


def test_complete_data_is_kept_and_force_replaces_it_only_when_complete(work, fake_gdown):
    make_archive(fake_gdown["FAKE_ARCHIVE"])
    existing = work / "hw2_data"
    for part in PARTS:
        (existing / part).mkdir(parents=True)
    (existing / "face" / "mine.txt").write_text("keep me")
    before = listing(work)

    result = run(["--data-only"], work, **fake_gdown, FAKE_FAIL="1")  # a complete tree is not even downloaded again
    assert result.returncode == 0 and "already complete" in result.stdout
    assert_one_error_line(run(["--data-only", "--force"], work, **fake_gdown, FAKE_FAIL="1"), "failed")
    assert listing(work) == before and (existing / "face" / "mine.txt").read_text() == "keep me"

    result = run(["--data-only", "--force"], work, **fake_gdown)
    assert result.returncode == 0, result.stderr
    assert not (existing / "face" / "mine.txt").exists() and (existing / "face" / "file.txt").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["hw2_data"]


def test_incomplete_data_needs_force(work, fake_gdown):
    make_archive(fake_gdown["FAKE_ARCHIVE"])
    (work / "hw2_data" / "face").mkdir(parents=True)
    assert_one_error_line(run(["--data-only"], work, **fake_gdown), "lacks digits/mnistm", "--force")
    assert listing(work) == ["hw2_data", "hw2_data/face"]


def test_a_toy_world_is_replaced_by_the_download(work, fake_gdown):
    make_archive(fake_gdown["FAKE_ARCHIVE"])
    (work / "hw2_data").mkdir()
    (work / "hw2_data" / TOY_MARKER).write_text("{}")
    result = run(["--data-only"], work, **fake_gdown)
    assert result.returncode == 0, result.stderr
    assert not (work / "hw2_data" / TOY_MARKER).exists() and (work / "hw2_data" / "face" / "file.txt").is_file()


def test_toy_refuses_to_overwrite_real_data(work):
    (work / "hw2_data" / "face").mkdir(parents=True)
    (work / "hw2_data" / "face" / "UNet.pt").write_bytes(b"real")
    result = run(["--toy"], work)
    assert_one_error_line(result, "not a toy world")
    assert listing(work) == ["hw2_data", "hw2_data/face", "hw2_data/face/UNet.pt"]
    assert (work / "hw2_data" / "face" / "UNet.pt").read_bytes() == b"real"


def test_toy_passes_out_and_seed_to_toy_data(work):
    recorder = work.parent / "record_args.sh"
    recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
    recorder.chmod(0o755)
    record = work.parent / "args.txt"
    result = run(["--toy", "--out", "elsewhere/", "--seed", "7"], work, PYTHON=str(recorder), RECORD=str(record))
    assert result.returncode == 0, result.stderr
    assert record.read_text().splitlines() == [str(REPO / "toy_data.py"), "--out", "elsewhere", "--seed", "7"]


@pytest.mark.slow
def test_toy_builds_the_same_world_as_the_fixture(work, toy_world):
    result = run(["--toy"], work)
    assert result.returncode == 0, result.stderr
    built = work / "hw2_data"
    files = [p for p in listing(toy_world) if (toy_world / p).is_file()]
    assert [p for p in listing(built) if (built / p).is_file()] == files
    different = [p for p in files if (built / p).read_bytes() != (toy_world / p).read_bytes()]
    assert different == [], f"not deterministic across processes: {different[:5]}"


@pytest.mark.parametrize("args, fragment", [(["--bogus"], "unknown option '--bogus'"), (["--out"], "--out needs"),
                                            (["--seed", "x"], "--seed needs")])
def test_bad_options(work, args, fragment):
    assert_one_error_line(run(args, work), fragment)


def test_help(work):
    result = run(["--help"], work)
    assert result.returncode == 0 and "--toy" in result.stdout and "--force" in result.stdout
    assert listing(work) == []
