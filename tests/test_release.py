"""Grading day, both sides: the student packs a release and serves it (HTTP on 127.0.0.1 only), and a second clone
fetches it with `hw2_download.sh --weights-only` and runs the graders' scripts (`hw2_release.py --check`).

The student's repository is a fresh git repository made from this working tree's tracked and untracked, not
ignored files (what `git clone` of a commit would give), so the code under test is the code on disk."""

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import hw2_release
import p1_train
import p3_textual_inversion as ti
import release_manifest
from p1_eval import EVALUATOR_NAME, ClassifierConfig, DigitClassifier
from p1_inference import generate
from utils import Hw2Error, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
P1_LIMIT = 16  # training images per digit set: with batch 32, one optimizer step
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "hw2 test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "hw2 test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: refused at once, like a dead server

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], env=GIT_ENV, check=True, capture_output=True,
                          text=True).stdout


def working_tree_repository(folder):
    """A new git repository holding this working tree's tracked and untracked, not ignored files, committed."""
    names = git(REPO, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():  # a tracked file deleted on disk is listed too
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "the code under test")
    return folder


@contextlib.contextmanager
def serve(folder):
    """An HTTP server on 127.0.0.1 for `folder`; yields its URL and the list of (path, status) it answered."""
    answered = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_request(self, code="-", size="-"):
            answered.append((self.path, int(code)))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", answered
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def hw2_download(clone, *args, **env):
    return subprocess.run(["bash", str(clone / "hw2_download.sh"), *args], cwd=clone, env={**ENV, **env},
                          capture_output=True, text=True, timeout=120)


def download(clone, *flags, **env):
    return hw2_download(clone, "--weights-only", *flags, **env)


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def snapshot(folder):
    """Every file under `folder` (ignored ones too, .git included) with its size and modification time."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def released(toy_world, tmp_path_factory):
    """The student's side: a tiny P1 (one step) and both textual-inversion concepts (one step each) trained with
    the scripts' smallest settings, a random P1 evaluator, the release packed for the local server, and the
    manifest committed. Yields the repository, the server's URL and its answered requests."""
    student = working_tree_repository(tmp_path_factory.mktemp("student"))
    checkpoints = student / "checkpoints"
    p1_train.main(["--data", str(toy_world / "digits"), "--out", str(checkpoints / "p1"), "--limit", str(P1_LIMIT),
                   "--epochs", "1", "--batch-size", str(2 * P1_LIMIT), "--grid-every", "0", "--device", "cpu"])
    ti.main(["train", "--input-json", str(toy_world / "textual_inversion" / "input.json"), "--out",
             str(checkpoints / "p3_ti"), "--steps", "1", "--batch-size", "1", "--device", "cpu"])
    save_checkpoint(checkpoints / "p1" / EVALUATOR_NAME,  # random weights: the rehearsal's scoring path only
                    {"config": asdict(ClassifierConfig()), "model": DigitClassifier(ClassifierConfig()).state_dict()})
    with serve(student / "release") as (url, answered):
        hw2_release.main(["--repo", str(student), "--url-base", url])
        git(student, "add", "hw2_release.json")
        git(student, "commit", "-q", "-m", "Release the trained weights")
        yield SimpleNamespace(repo=student, url=url, answered=answered,
                              files=release_manifest.read_manifest(student / "hw2_release.json"))


# ------------------------------------------------------------------------------------------------- the release


def training_data_fingerprint(digits, rows):
    """sha256 of the first `rows` train.csv images of each set as uint8 CxHxW (PIL), then digits, then set ids."""
    images, labels, sets = [], [], []
    for set_id, name in enumerate(("mnistm", "svhn")):
        for line in (digits / name / "train.csv").read_text().splitlines()[1:rows + 1]:
            file_name, label = line.split(",")
            images.append(np.asarray(Image.open(digits / name / "data" / file_name).convert("RGB")).transpose(2, 0, 1))
            labels.append(int(label))
            sets.append(set_id)
    digest = hashlib.sha256(np.ascontiguousarray(np.stack(images)).tobytes())
    digest.update(np.array(labels, dtype=np.int64).tobytes())
    digest.update(np.array(sets, dtype=np.int64).tobytes())
    return digest.hexdigest()


def test_the_p1_release_is_a_quarter_of_the_checkpoint_and_samples_the_same_images(released, toy_world):
    full = released.repo / "checkpoints" / "p1" / "ddpm.safetensors"
    release = released.repo / "release" / "p1-ddpm.safetensors"
    assert release.stat().st_size <= full.stat().st_size / 4, (release.stat().st_size, full.stat().st_size)
    state = load_checkpoint(release)
    assert set(state) == {"config", "train", "ema", "epoch", "step", "preset", "data_fingerprint"}
    with safe_open(release, framework="pt") as handle:
        header = handle.metadata()
    fingerprint = training_data_fingerprint(toy_world / "digits", P1_LIMIT)
    assert (header["preset"], header["step"], header["data_fingerprint"]) == ("toy", "1", fingerprint)

    args = SimpleNamespace(sampler="ddim", steps=3, eta=0.0, guidance=state["train"]["guidance"], seed=0,
                           batch_size=7)
    images = {}
    for name, path, weights in (("release", release, "ema"), ("full", full, "ema"), ("online", full, "model")):
        diffusion, _ = p1_train.load_model_checkpoint(path, weights=weights)
        images[name], _ = generate(diffusion.eval(), args, torch.device("cpu"), per_digit=1)
    assert torch.equal(images["release"], images["full"])
    assert not torch.equal(images["release"], images["online"]), "EMA and online weights agree: the test is blind"
    with pytest.raises(Hw2Error, match="EMA weights only"):  # what --resume reads
        p1_train.load_model_checkpoint(release, weights="model")


def test_the_manifest_lists_every_file_with_its_hash_size_and_url(released):
    release = released.repo / "release"
    assert sorted(p.name for p in release.iterdir()) == sorted(entry["name"] for entry in released.files)
    assert [entry["destination"] for entry in released.files] == [
        "checkpoints/p1/ddpm.safetensors", "checkpoints/p3_ti/0/learned_embeds.safetensors",
        "checkpoints/p3_ti/1/learned_embeds.safetensors"]
    for entry in released.files:
        data = (release / entry["name"]).read_bytes()
        assert (entry["sha256"], entry["bytes"], entry["url"]) == (
            hashlib.sha256(data).hexdigest(), len(data), f"{released.url}/{entry['name']}")
        if "p3_ti" in entry["name"]:  # the embeddings travel unchanged
            assert data == (released.repo / entry["destination"]).read_bytes()


# ------------------------------------------------------------------------------------------------ the TA's side


def test_a_fresh_clone_fetches_the_release_and_passes_the_graders_scripts(released, toy_world, tmp_path, capsys,
                                                                            monkeypatch):
    """`hw2_release.py --check` in the student's repository: clone HEAD, `hw2_download.sh --weights-only` from the
    server, hw2_1.sh (1,000 PNGs), hw2_3.sh into the course's output_folder_example with its placeholder files, the
    scores. The data has no face UNet, so hw2_2.sh is skipped. The student's repository does not change."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "hw2_data"  # the toy world without face/
    data.mkdir()
    shutil.copy(toy_world / "TOY", data / "TOY")
    for part in ("textual_inversion", "toy_models"):
        (data / part).symlink_to(toy_world / part)
    before, answered = snapshot(released.repo), len(released.answered)
    work = tmp_path / "rehearsal"

    status = hw2_release.main(["--repo", str(released.repo), "--check", "--quick", "--workdir", str(work),
                               "--data", str(data)])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("hw2_")}
    assert "pass" in rows["hw2_download.sh"] and "3 file(s)" in rows["hw2_download.sh"], out
    assert "pass" in rows["hw2_1.sh"] and "MNIST-M 0." in rows["hw2_1.sh"] and "SVHN " in rows["hw2_1.sh"], out
    assert "skipped" in rows["hw2_2.sh"] and "UNet.pt" in rows["hw2_2.sh"], out
    assert "pass" in rows["hw2_3.sh"] and "passed " in rows["hw2_3.sh"], out

    clone = work / "hw2"
    assert git(clone, "rev-parse", "HEAD") == git(released.repo, "rev-parse", "HEAD")
    assert sorted(released.answered[answered:]) == sorted((f"/{entry['name']}", 200) for entry in released.files)
    assert files_under(clone / "checkpoints") == sorted(entry["destination"].removeprefix("checkpoints/")
                                                        for entry in released.files)
    for entry in released.files:
        assert hashlib.sha256((clone / entry["destination"]).read_bytes()).hexdigest() == entry["sha256"]

    for name in ("mnistm", "svhn"):
        assert files_under(work / "p1_out" / name) == sorted(f"{d}_{i:03d}.png" for d in range(10)
                                                             for i in range(1, 51))
    input_json = json.loads((toy_world / "textual_inversion" / "input.json").read_text())
    for concept, entry in input_json.items():
        for p in range(len(entry["prompt"])):
            folder = work / "output_folder_example" / concept / str(p)
            assert files_under(folder) == sorted([hw2_release.PLACEHOLDER] + [
                f"source{concept}_prompt{p}_{i}.png" for i in range(25)]), folder
    assert snapshot(released.repo) == before, "the rehearsal changed the student's repository"


@pytest.fixture()
def clone(released, tmp_path):
    folder = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(released.repo), str(folder))
    return folder


def test_a_second_download_downloads_nothing(released, clone):
    first = download(clone)
    assert first.returncode == 0, first.stderr
    count = len(released.answered)
    again = download(clone)
    assert again.returncode == 0, again.stderr
    assert "0 downloaded" in again.stdout and again.stdout.count("already present") == len(released.files)
    assert len(released.answered) == count, "the second run downloaded again"


def rewrite_urls(clone, url):
    manifest = clone / "hw2_release.json"
    files = release_manifest.read_manifest(manifest)
    for entry in files:
        entry["url"] = f"{url}/{entry['name']}"
    manifest.write_text(release_manifest.manifest_text(files))
    return files


def test_a_tampered_file_is_refused_with_its_hash_and_nothing_is_replaced(released, clone, tmp_path):
    served = tmp_path / "tampered"
    shutil.copytree(released.repo / "release", served)
    p1 = served / "p1-ddpm.safetensors"
    p1.write_bytes(p1.read_bytes()[:-1] + b"\0")
    with serve(served) as (url, _):
        files = rewrite_urls(clone, url)
        error = one_error_line(download(clone))
        assert not (clone / "checkpoints").exists(), files_under(clone / "checkpoints")

        mine = clone / "checkpoints" / "p1" / "ddpm.safetensors"  # a local P1 of the student's own
        mine.parent.mkdir(parents=True)
        mine.write_bytes(b"my own checkpoint")
        refused = one_error_line(download(clone))
        forced = one_error_line(download(clone, "--force"))
    assert hashlib.sha256(p1.read_bytes()).hexdigest() in error and files[0]["sha256"] in error, error
    assert "exists and differs" in refused and "--force" in refused, refused
    assert hashlib.sha256(p1.read_bytes()).hexdigest() in forced, forced
    assert mine.read_bytes() == b"my own checkpoint" and files_under(clone / "checkpoints") == ["p1/ddpm.safetensors"]


def test_a_dead_server_is_one_line_and_leaves_nothing(clone):
    rewrite_urls(clone, CLOSED_PORT)
    error = one_error_line(download(clone))
    assert f"cannot download p1-ddpm.safetensors from {CLOSED_PORT}/p1-ddpm.safetensors" in error, error
    assert "nothing was written" in error and not (clone / "checkpoints").exists()


def test_the_default_run_fetches_the_weights_then_the_data_and_data_only_no_weights(released, clone):
    """Offline for the data (the probe hits a closed port): --data-only fails at once and fetches no weights; the
    default run fetches the weights first, then fails on the data."""
    count = len(released.answered)
    data_only = hw2_download(clone, "--data-only", HW2_NET_CHECK_URL=CLOSED_PORT)
    assert "cannot reach" in one_error_line(data_only) and not (clone / "checkpoints").exists()
    assert len(released.answered) == count
    both = hw2_download(clone, HW2_NET_CHECK_URL=CLOSED_PORT)
    assert "cannot reach" in one_error_line(both) and "Weights ready" in both.stdout
    assert files_under(clone / "checkpoints") == sorted(entry["destination"].removeprefix("checkpoints/")
                                                        for entry in released.files)
    assert len(released.answered) == count + len(released.files)


FAKE_GDOWN = """#!/usr/bin/env bash
# stand-in for gdown: `gdown URL -O FILE -q` copies $DRIVE_FOLDER/<id> (the URL's id=...) to FILE
id="${1##*id=}"
[[ -f "$DRIVE_FOLDER/$id" ]] || { echo "Access denied: $id" >&2; exit 1; }
cp "$DRIVE_FOLDER/$id" "$3"
"""


def test_google_drive_links_and_ids_are_fetched_with_gdown(released, clone, tmp_path):
    """--drive NAME=ID writes the link gdown reads; the download goes through `gdown` (a local stand-in here)."""
    drive = tmp_path / "drive"
    (drive / "bin").mkdir(parents=True)
    (drive / "bin" / "gdown").write_text(FAKE_GDOWN)
    (drive / "bin" / "gdown").chmod(0o755)
    ids = {entry["name"]: f"FileId{k:02d}abcdefghijklmnopqrstuv" for k, entry in enumerate(released.files)}
    for name, file_id in ids.items():
        shutil.copy(released.repo / "release" / name, drive / file_id)
    links = hw2_release.parse_drive([f"{name}={file_id}" for name, file_id in ids.items()])
    assert links == {name: f"https://drive.google.com/uc?id={file_id}" for name, file_id in ids.items()}
    files = release_manifest.read_manifest(clone / "hw2_release.json")
    for entry in files:
        entry["url"] = links[entry["name"]]
    (clone / "hw2_release.json").write_text(release_manifest.manifest_text(files))
    env = {"PATH": f"{drive / 'bin'}{os.pathsep}{os.environ['PATH']}", "DRIVE_FOLDER": str(drive)}
    result = download(clone, **env)
    assert result.returncode == 0, result.stderr
    assert files_under(clone / "checkpoints") == sorted(e["destination"].removeprefix("checkpoints/") for e in files)

    (drive / ids["p1-ddpm.safetensors"]).unlink()  # a link nobody shared
    (clone / "checkpoints" / "p1" / "ddpm.safetensors").unlink()
    assert "gdown failed: Access denied" in one_error_line(download(clone, **env))
    with pytest.raises(Hw2Error, match="NAME=LINK"):
        hw2_release.parse_drive(["p1-ddpm.safetensors"])


@pytest.mark.parametrize("destination", ["../escape.safetensors", "/etc/hw2.safetensors", "hw2_1.sh",
                                         "checkpoints/../hw2_1.sh", "checkpoints"])
def test_a_manifest_cannot_write_outside_checkpoints(tmp_path, destination):
    """A manifest names files for a stranger's machine: nothing may land beside the code (e.g. replace hw2_1.sh)."""
    entry = {"name": "x.safetensors", "destination": destination, "url": "", "sha256": "0" * 64, "bytes": 1}
    (tmp_path / "hw2_release.json").write_text(release_manifest.manifest_text([entry]))
    with pytest.raises(release_manifest.ReleaseError, match="must lie under checkpoints/"):
        release_manifest.read_manifest(tmp_path / "hw2_release.json")


def test_help_names_the_weights(tmp_path):
    result = hw2_download(REPO, "--help")
    assert result.returncode == 0 and "--weights-only" in result.stdout and "hw2_release.json" in result.stdout


def test_the_rehearsals_sd_model_is_the_flag_the_toy_model_or_the_courses_file(toy_world, tmp_path):
    """hw2_3.sh is skipped (None) only when no SD v1.4 model is at hand."""
    real = tmp_path / "hw2_data" / "textual_inversion" / "input.json"  # no TOY marker: real data
    no_flag = SimpleNamespace(sd=None)
    assert hw2_release.sd_model(no_flag, real, tmp_path) is None
    course = tmp_path / hw2_release.COURSE_SD
    course.parent.mkdir(parents=True)
    course.write_bytes(b"")
    assert hw2_release.sd_model(no_flag, real, tmp_path) == str(course)
    assert hw2_release.sd_model(SimpleNamespace(sd="CompVis/stable-diffusion-v1-4"), real, tmp_path) == \
        "CompVis/stable-diffusion-v1-4"
    toy_json = toy_world / "textual_inversion" / "input.json"
    assert hw2_release.sd_model(no_flag, toy_json, REPO) == str(toy_world.resolve() / "toy_models" / "tiny-sd")


def test_the_rehearsals_p2_score_is_the_mse_against_the_same_numbered_ground_truth(toy_world, tmp_path):
    gt = toy_world / "face" / "GT"
    shutil.copy(gt / "00.png", tmp_path / "00.png")
    shutil.copy(gt / "02.png", tmp_path / "01.png")  # a wrong image for 01
    pixels = [np.asarray(Image.open(gt / name).convert("RGB"), dtype=np.float64) for name in ("01.png", "02.png")]
    expected = np.mean((pixels[0] - pixels[1]) ** 2) / 2  # 00 is exact
    assert hw2_release.score_p2(tmp_path, gt) == f"mean MSE {expected:.4f} over 2 images (0-255 scale, against GT/)"
