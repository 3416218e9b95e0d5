"""Release the trained weights for grading, and rehearse the grading from a fresh clone.

    python hw2_release.py --url-base https://example.org/hw2      # checkpoints/ -> release/ + hw2_release.json
    python hw2_release.py --drive p1-ddpm.safetensors=https://drive.google.com/file/d/FILE_ID/view
    python hw2_release.py --check                                 # the TA's run, in a temp clone of HEAD

`checkpoints/` is not in git, so a fresh clone has no weights until `bash hw2_download.sh` fetches them. Packing
writes into `release/` (git-ignored) what grading needs, each file named after its destination (p1/ddpm.safetensors
-> p1-ddpm.safetensors):
- P1: the EMA weights, model config and training settings of the newest checkpoints/p1/ddpm*.safetensors, with its
  preset, step and training-data fingerprint in the safetensors header; no online weights, optimizer or random
  states (a quarter of the training checkpoint). p1_inference.py loads it as it loads the training checkpoint and
  samples the same images;
- textual inversion: every checkpoints/p3_ti/**/learned_embeds.safetensors (what hw2_3.sh loads);
- Custom Diffusion, when trained: checkpoints/p3_cd's weights and token files.
It then writes the manifest `hw2_release.json` (per file: destination, URL, sha256, bytes), meant to be committed,
and prints what to upload and what to commit. A URL is `--url-base`/<file name>, a Google Drive share link or file
id given with `--drive` (fetched with gdown), or the one the previous manifest gave an unchanged file.

`--check` plays the TA: it clones the committed HEAD into a temp folder, runs `bash hw2_download.sh --weights-only`
there (the manifest's URLs), then hw2_1.sh, hw2_2.sh and hw2_3.sh on the data at hand (P3 into the course's
output_folder_example layout, placeholder files included), scores the outputs (`p1_eval.py score`, the P2 MSE
against GT, `score`) and prints one table. A script whose inputs are missing is skipped, with the reason. Nothing
outside the temp folder changes, but for the caches the scripts keep anyway (SD's converted checkpoint, the hub's).
"""

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

import p1_eval
import p3_textual_inversion as ti
from custom_diffusion_io import WEIGHTS_FILE, token_files
from p1_inference import find_latest_checkpoint
from p1_model import PRESETS, P1Config
from p1_train import DEFAULT_OUT, load_model_checkpoint
from p2_ddim import load_ground_truth, mse_255
from p3_concepts import read_input_json
from p3_custom_diffusion import DEFAULT_WEIGHTS_DIR
from release_manifest import (
    DESTINATION_ROOT,
    MANIFEST_NAME,
    ReleaseError,
    drive_url,
    manifest_text,
    read_manifest,
    sha256_file,
)
from sd_v1 import default_model
from utils import Hw2Error, atomic_dir, atomic_write_text, find_toy_root, load_rgb, run_cli, save_checkpoint

REPO = Path(__file__).resolve().parent
RELEASE_DIR = "release"  # git-ignored
P1_DIR, TI_DIR, CD_DIR = DEFAULT_OUT.name, ti.DEFAULT_EMBEDS_DIR.name, DEFAULT_WEIGHTS_DIR.name  # under checkpoints/
COURSE_SD = Path("stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt")  # the course's SD v1.4 location
PLACEHOLDER = "put_your_25_images_here.txt"  # in each prompt folder of the course's output_folder_example
QUICK_FLAGS = ["--steps", "1"]  # --quick: one sampling step for hw2_1.sh and hw2_3.sh

# ------------------------------------------------------------------------------------------------- packing


def release_name(destination):
    """The flat name of a release file: its destination below checkpoints/, with / written as - ."""
    return "-".join(Path(destination).relative_to(DESTINATION_ROOT).parts)


def infer_preset(config):
    """The P1 preset whose model config is `config` (a dict), or "custom"; for checkpoints that predate the
    recorded preset name."""
    config = P1Config.from_dict(config)
    return next((name for name, preset in PRESETS.items() if preset == config), "custom")


def p1_release(state):
    """What sampling needs from a P1 training checkpoint `state`, and where it came from: the EMA weights, the model
    config, the training settings (the default guidance weight), epoch, step, preset and data fingerprint."""
    release = {key: state[key] for key in ("config", "train", "ema", "epoch", "step") if key in state}
    release["preset"] = state.get("preset") or infer_preset(state["config"])
    release["data_fingerprint"] = state.get("data_fingerprint") or "unknown (not recorded by this checkpoint)"
    return release


def p1_header(release):
    """The release's provenance as plain safetensors header entries, readable without this repository."""
    return {"preset": str(release["preset"]), "step": str(release.get("step")), "epoch": str(release.get("epoch")),
            "data_fingerprint": str(release["data_fingerprint"])}


def first_key(path):
    """The first tensor name of a safetensors file (a learned token); any defect is an Hw2Error naming the file."""
    try:
        with safe_open(path, framework="pt") as handle:
            return next(iter(handle.keys()), "?")
    except (SafetensorError, OSError) as err:
        raise Hw2Error(f"cannot release {path}: it is not a readable safetensors file ({err})") from err


def release_parts(checkpoints):
    """(kind, source file, destination) of everything grading needs under `checkpoints`, P1 first."""
    parts = []
    if list((checkpoints / P1_DIR).glob("ddpm*.safetensors")):
        parts.append(("p1", find_latest_checkpoint(checkpoints / P1_DIR)))  # the one hw2_1.sh samples from
    parts += [("ti", path) for path in sorted((checkpoints / TI_DIR).rglob(ti.EMBEDS_FILE))]
    if (checkpoints / CD_DIR / WEIGHTS_FILE).is_file():
        parts += [("cd", path) for path in [checkpoints / CD_DIR / WEIGHTS_FILE, *token_files(checkpoints / CD_DIR)]]
    return [(kind, path, f"{DESTINATION_ROOT}/{path.relative_to(checkpoints).as_posix()}") for kind, path in parts]


def pack_part(kind, source, target):
    """Write the release file of one part to `target`; returns its description and the extra manifest fields."""
    if kind == "p1":
        _, state = load_model_checkpoint(source)  # refuses anything that is not a P1 checkpoint this code can build
        release = p1_release(state)
        save_checkpoint(target, release, metadata=p1_header(release))
        return (f"P1 EMA weights and config (preset {release['preset']}, step {release.get('step')})",
                {"source_sha256": sha256_file(source)})
    shutil.copyfile(source, target)
    if kind == "ti":
        return f"textual inversion {first_key(target)}", {}
    if source.name == WEIGHTS_FILE:
        return "Custom Diffusion cross-attention weights", {}
    return f"Custom Diffusion token {first_key(target)}", {}


def parse_drive(values):
    """{file name: Drive URL} from --drive NAME=LINK_OR_ID flags."""
    links = {}
    for value in values or []:
        name, sep, link = value.partition("=")
        if not sep or not name or not link:
            raise Hw2Error(f"--drive {value!r}: write NAME=LINK, e.g. --drive p1-ddpm.safetensors=https://drive."
                           f"google.com/file/d/FILE_ID/view")
        try:
            links[name] = drive_url(link)
        except ReleaseError as err:
            raise Hw2Error(f"--drive {name}: {err}") from err
    return links


def previous_urls(manifest):
    """{(name, sha256): url} of the current manifest, so that re-packing keeps the URLs of unchanged files."""
    if not manifest.is_file():
        return {}
    try:
        return {(entry["name"], entry["sha256"]): entry["url"] for entry in read_manifest(manifest)}
    except ReleaseError as err:
        print(f"warning: the URLs of the current {manifest.name} are not reused ({err})")
        return {}


def choose_url(name, sha256, url_base, drive, previous):
    if name in drive:
        return drive[name]
    if url_base:
        return f"{url_base.rstrip('/')}/{name}"
    return previous.get((name, sha256), "")


def pack(args):
    repo = Path(args.repo)
    checkpoints, release_dir, manifest = repo / DESTINATION_ROOT, repo / RELEASE_DIR, repo / MANIFEST_NAME
    parts = release_parts(checkpoints)
    if not parts:
        raise Hw2Error(f"nothing to release under {checkpoints}: train P1 (python p1_train.py) and textual "
                       f"inversion (python p3_textual_inversion.py train ...) first")
    kinds = {kind for kind, _, _ in parts}
    for kind, missing in (("p1", f"no {P1_DIR}/ddpm*.safetensors: hw2_1.sh will have nothing to sample from"),
                          ("ti", f"no {TI_DIR}/**/{ti.EMBEDS_FILE}: hw2_3.sh will have no learned tokens")):
        if kind not in kinds:
            print(f"warning: {checkpoints} holds {missing}")
    drive = parse_drive(args.drive)
    names = [release_name(destination) for _, _, destination in parts]
    unknown = sorted(set(drive) - set(names))
    if unknown:
        raise Hw2Error(f"--drive names {', '.join(unknown)}, which the release does not hold ({', '.join(names)})")
    if release_dir.exists():
        strays = [p.name for p in release_dir.iterdir() if p.suffix != ".safetensors" or not p.is_file()]
        if strays:
            raise Hw2Error(f"{release_dir} holds files this script did not write ({', '.join(strays[:3])}); it is "
                           f"rewritten on every release: move them away")
    previous = previous_urls(manifest)
    entries = []
    with atomic_dir(release_dir) as tmp:  # the earlier release goes only once the new one is complete
        for (kind, source, destination), name in zip(parts, names):
            print(f"Packing {source} ...", flush=True)
            description, extra = pack_part(kind, source, tmp / name)
            sha256 = sha256_file(tmp / name)
            entries.append({"name": name, "destination": destination,
                            "url": choose_url(name, sha256, args.url_base, drive, previous), "sha256": sha256,
                            "bytes": (tmp / name).stat().st_size, "description": description, **extra})
    atomic_write_text(manifest, manifest_text(entries))
    print_instructions(entries, release_dir, manifest, repo)
    return entries


def size_text(count):
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"


def print_instructions(entries, release_dir, manifest, repo):
    total = sum(entry["bytes"] for entry in entries)
    print(f"\nRelease: {len(entries)} file(s), {size_text(total)} in {release_dir}")
    width = max(len(entry["name"]) for entry in entries)
    for entry in entries:
        print(f"  {entry['name']:<{width}}  {size_text(entry['bytes']):>8} -> {entry['destination']}: "
              f"{entry['description']}")
    print("\n1. Upload every file of release/ so that its URL serves it:")
    for entry in entries:
        print(f"     {entry['name']}: {entry['url'] or 'no URL yet'}")
    if any(not entry["url"] for entry in entries):
        print("   Files without a URL: upload them (a web folder: rerun with --url-base URL; Google Drive, shared "
              "with anyone with the link: rerun with --drive NAME=LINK for each) so that the manifest names them.")
    print(f"2. Commit the manifest (not the weights):\n     git -C {repo} add {manifest.name} && "
          f"git -C {repo} commit -m \"Release the trained weights\"")
    print("3. Rehearse the grading from a fresh clone: python hw2_release.py --check")


# ----------------------------------------------------------------------------------------------- rehearsal


@dataclass
class StepResult:
    name: str
    status: str  # pass, fail or skipped
    seconds: float | None
    note: str  # the score, the reason for a skip, or the error of a failure


def run_logged(command, cwd, log, env):
    """Run `command` with its output in `log`; returns (exit status, wall seconds)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    return result.returncode, time.perf_counter() - start


def last_error(log):
    """The `error: ...` line of a failed script's log, or its last line."""
    lines = [line.strip() for line in Path(log).read_text(errors="replace").replace("\r", "\n").splitlines()
             if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def scored_output(main, argv):
    """The printed output of a scoring command run in this process (torch is loaded already), or "not scored: ..."."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            main(argv)
    except Hw2Error as err:
        return f"not scored: {err}"
    except Exception as err:  # a scorer that breaks (e.g. offline, no CLIP weights) must not hide the table
        return f"not scored: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return buffer.getvalue()


def score_p1(out, evaluator):
    if not evaluator.is_file():
        return f"not scored: no {evaluator} (python p1_eval.py train)"
    output = scored_output(p1_eval.main, ["score", str(out), "--evaluator", str(evaluator)])
    accuracies = re.findall(r"^(MNIST-M|SVHN) acc = ([0-9.]+)", output, flags=re.M)
    if not accuracies:
        return output
    return ", ".join(f"{name} {float(acc):.3f}" for name, acc in accuracies) + " (p1_eval.py score)"


def score_p2(out, gt_dir):
    if not gt_dir.is_dir():
        return f"not scored: no {gt_dir}"
    outputs = sorted(out.glob("*.png"))
    truth = load_ground_truth(gt_dir, [path.stem for path in outputs], np.asarray(load_rgb(outputs[0])).shape[:2])
    errors = [mse_255(np.asarray(load_rgb(path)), reference) for path, reference in zip(outputs, truth)]
    return f"mean MSE {np.mean(errors):.4f} over {len(errors)} images (0-255 scale, against {gt_dir.name}/)"


def score_p3(input_json, out):
    output = scored_output(ti.main, ["score", str(input_json), str(out)])
    passed = re.search(r"^passed \d+/\d+", output, flags=re.M)
    return f"{passed.group(0)} prompts (score)" if passed else output


def course_output_folder(folder, data):
    """The course's output_folder_example: {concept}/{prompt}/put_your_25_images_here.txt for every prompt."""
    placeholders = [folder / concept / str(p) / PLACEHOLDER for concept, entry in data.items()
                    for p in range(len(entry["prompt"]))]
    for path in placeholders:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return placeholders


def sd_model(args, input_json, repo):
    """The SD v1.4 model for hw2_3.sh: --sd, the toy model on a toy world, or the course's model.ckpt; else None."""
    if args.sd:
        return args.sd
    if find_toy_root(input_json) is not None:
        return default_model(input_json)
    return str(repo / COURSE_SD) if (repo / COURSE_SD).is_file() else None


def script_step(name, command, work, env, score):
    """Run one grading script from `work`: pass with `score()`, or fail with the script's error line."""
    log = work / "logs" / f"{name.split()[0]}.log"
    status, seconds = run_logged(command, work, log, env)
    return StepResult(name, "fail" if status else "pass", seconds, last_error(log) if status else score())


def rehearsal_steps(args, repo, clone, work, env):
    """Run the TA's sequence in `clone`; yields a StepResult per script as it finishes."""
    data, quick = Path(args.data), QUICK_FLAGS if args.quick else []
    manifest = clone / MANIFEST_NAME
    yield script_step("hw2_download.sh --weights-only", ["bash", clone / "hw2_download.sh", "--weights-only"], work,
                      env, lambda: f"{len(read_manifest(manifest))} file(s), "
                                   f"{size_text(sum(entry['bytes'] for entry in read_manifest(manifest)))}")
    evaluator = repo / DESTINATION_ROOT / P1_DIR / p1_eval.EVALUATOR_NAME
    yield script_step("hw2_1.sh", ["bash", clone / "hw2_1.sh", work / "p1_out", *quick], work, env,
                      lambda: score_p1(work / "p1_out", evaluator))

    face = data / "face"
    if not (face / "UNet.pt").is_file() or not (face / "noise").is_dir():
        yield StepResult("hw2_2.sh", "skipped", None, f"no {face / 'UNet.pt'} or {face / 'noise'}")
    else:
        yield script_step("hw2_2.sh", ["bash", clone / "hw2_2.sh", face / "noise", work / "p2_out", face / "UNet.pt"],
                          work, env, lambda: score_p2(work / "p2_out", face / "GT"))

    input_json = data / "textual_inversion" / "input.json"
    model = sd_model(args, input_json, repo) if input_json.is_file() else None
    if model is None:
        reason = f"no {input_json}" if not input_json.is_file() else (
            f"no SD v1.4 model: pass --sd PATH (the course's model.ckpt) or put it at {COURSE_SD}")
        yield StepResult("hw2_3.sh", "skipped", None, reason)
        return
    out = work / "output_folder_example"
    placeholders = course_output_folder(out, read_input_json(input_json, ("token_name", "prompt")))
    result = script_step("hw2_3.sh", ["bash", clone / "hw2_3.sh", input_json, out, model, *quick], work, env,
                         lambda: score_p3(input_json, out))
    lost = [path for path in placeholders if not path.is_file()]
    if lost and result.status == "pass":
        result = StepResult("hw2_3.sh", "fail", result.seconds, f"{len(lost)} {PLACEHOLDER} file(s) were removed")
    yield result


def git(repo, *command):
    result = subprocess.run(["git", "-C", str(repo), *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise Hw2Error(f"git {' '.join(command)} failed in {repo}: {(result.stderr.strip().splitlines() or [''])[-1]}"
                       f"; --check clones the committed HEAD of a git repository")
    return result.stdout


def check(args):
    repo = Path(args.repo).resolve()
    args.data = args.data or str(repo / "hw2_data")
    head = git(repo, "rev-parse", "--short", "HEAD").strip()
    # --no-optional-locks: a plain `git status` refreshes the repository's index file, a change outside the rehearsal
    dirty = git(repo, "--no-optional-locks", "status", "--porcelain", "--untracked-files=normal").splitlines()
    if dirty:
        print(f"note: {len(dirty)} uncommitted change(s) in {repo} are not part of the rehearsal, as they would not "
              f"be part of the TA's clone (first: {dirty[0].strip()})")
    if args.workdir:
        work = Path(args.workdir).resolve()
        if work.exists() and any(work.iterdir()):
            raise Hw2Error(f"--workdir {work} is not empty: pass a new or empty folder")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="hw2_check_"))
    try:
        (work / "logs").mkdir()
        clone = work / "hw2"
        git(repo, "clone", "--quiet", str(repo), str(clone))
        print(f"Grading rehearsal in {work}: a clone of {repo} at {head}, data {args.data}", flush=True)
        env = {**os.environ, "PYTHON": sys.executable}
        results = []
        for result in rehearsal_steps(args, repo, clone, work, env):
            results.append(result)
            print(f"  {result.name}: {result.status}", flush=True)
        print_table(results)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Clone, outputs and logs kept in {work}." if args.workdir else
          "The temp folder is removed (pass --workdir DIR to keep the clone, outputs and logs).")
    return 1 if any(result.status == "fail" for result in results) else 0


def print_table(results):
    width = max(len(result.name) for result in results)
    print(f"\n{'script':<{width}}  {'result':<7}  {'wall s':>7}  score")
    for result in results:
        seconds = f"{result.seconds:7.1f}" if result.seconds is not None else f"{'-':>7}"
        print(f"{result.name:<{width}}  {result.status:<7}  {seconds}  {result.note}")


# ------------------------------------------------------------------------------------------------------- CLI


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.url_base and not re.match(r"https?://", args.url_base):
        raise Hw2Error(f"--url-base {args.url_base!r} must be a web address (http:// or https://)")
    if args.check:
        if args.url_base or args.drive:
            raise Hw2Error("--check rehearses the committed release; pack with --url-base / --drive first, commit, "
                           "then run --check alone")
        return check(args)
    pack(args)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url-base", default=None,
                        help="Web folder the release files are uploaded to: each URL is URL_BASE/<file name>.")
    parser.add_argument("--drive", action="append", default=None, metavar="NAME=LINK",
                        help="Google Drive share link or file id of one release file (fetched with gdown); "
                             "repeatable.")
    parser.add_argument("--repo", default=str(REPO),
                        help="Repository to release from or rehearse (default: the one holding this script).")
    parser.add_argument("--check", action="store_true",
                        help="Rehearse the grading: clone HEAD into a temp folder, download the weights, run the "
                             "three grading scripts, score them, print one table; exit status 1 if one fails.")
    parser.add_argument("--data", default=None,
                        help="With --check: the hw2_data folder the scripts read (default: REPO/hw2_data).")
    parser.add_argument("--sd", default=None,
                        help=f"With --check: the SD v1.4 model for hw2_3.sh (default: REPO/{COURSE_SD} if present, "
                             f"the tiny model on a toy world).")
    parser.add_argument("--quick", action="store_true",
                        help="With --check: one sampling step for hw2_1.sh and hw2_3.sh, which checks the whole path "
                             "in minutes; the scores then mean nothing.")
    parser.add_argument("--workdir", default=None,
                        help="With --check: rehearse in this new or empty folder and keep it (default: a temp "
                             "folder, removed afterwards).")
    return parser


if __name__ == "__main__":
    sys.exit(run_cli(main))
