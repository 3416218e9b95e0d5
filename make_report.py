"""Regenerate the whole hw2 report, every figure and number, from the data and checkpoints at hand.

    python make_report.py --data hw2_data --out report
    python make_report.py --data hw2_data --out report --quick      # toy world: tiny settings, seconds per part

Writes `OUT/report.md` with its figures beside it (OUT/p1, OUT/p2, OUT/p3_zeroshot, OUT/p3_ti, OUT/p3_multi) and the
output of each part's scripts in OUT/logs/<part>.log. The parts live in report_p1.py, report_p2.py and
report_p3.py; every number and image in them comes from the problem scripts' own functions (p1_inference, p1_eval,
p2_ddim, p2_interpolate, p3_clip_zeroshot, p3_textual_inversion, p3_custom_diffusion), run in this process.

A part whose prerequisite is missing (no checkpoint, no SD weights, no data) is skipped with one line, and the
report says what was skipped and why. A part that fails unexpectedly is recorded too, with its traceback in its
log; the other parts still run, and the exit status is then 1.

`--quick` samples with very few steps (a preview, not the report's numbers). On a toy world (`toy_data.py`) it
also trains, inside OUT, the short P1 model, P1 evaluator, textual-inversion embeddings and Custom Diffusion weights
it needs, so the report never depends on what lies in checkpoints/. Same inputs and seeds on the same device give
the same figures, byte for byte.
"""

import argparse
import contextlib
import hashlib
import io
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import p1_eval
import p1_train
import p3_custom_diffusion
import p3_textual_inversion
import report_p1
import report_p2
import report_p3
from report_common import code, table
from utils import TOY_MARKER, Hw2Error, announce_toy_world, atomic_write_text, find_toy_root, get_device, run_cli

HASH_LENGTH = 12  # hex digits of sha256 shown in the header
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Settings:
    """Sampler steps per part (None: the script's own default) and the tiny training runs of --quick."""

    p1_steps: int = None
    p2_steps: int = None
    ti_steps: int = None
    p1_train: tuple = ()
    p1_evaluator: tuple = ()
    ti_train: tuple = ()
    zeroshot_workers: int = None


FULL = Settings()
QUICK = Settings(p1_steps=5, p2_steps=5, ti_steps=2, zeroshot_workers=0,
                 # seconds on 2 cores: P1 one epoch over 64 images per dataset, no sample grid; the evaluator one
                 # epoch over 1,000 images per dataset
                 p1_train=("--epochs", "1", "--limit", "64", "--batch-size", "32", "--grid-every", "0"),
                 p1_evaluator=("--epochs", "1", "--limit", "1000"), ti_train=("--steps", "2", "--batch-size", "1"))


@dataclass
class Context:
    """What every part needs: the flags, the settings, where to write, and the header's list of models."""

    args: argparse.Namespace
    settings: Settings
    data: Path
    out: Path
    toy: bool
    console: object  # the real stdout: the scripts' own output goes to the part's log instead
    models: list = field(default_factory=list)  # (used by, path or id)

    def say(self, message):
        print(message, file=self.console, flush=True)
        print(message)  # into the part's log as well

    def device_flag(self):
        return ["--device", self.args.device] if self.args.device else []

    def seed_flag(self):
        return ["--seed", str(self.args.seed)]

    def steps_flag(self, steps):
        return [] if steps is None else ["--steps", str(steps)]

    def model(self, used_by, path):
        self.models.append((used_by, str(path)))


@dataclass
class PartResult:
    name: str
    title: str
    status: str  # done, skipped or failed
    reason: str
    seconds: float
    markdown: str  # the part's section of report.md when done


# ------------------------------------------------------------------------------------------ small helpers


def file_digest(path):
    """sha256 of a file, or of a folder (its files' relative paths and bytes, in sorted order); None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:HASH_LENGTH]


# ---------------------------------------------------------------------------------------------- report

PARTS = {
    "p1": ("P1: conditional diffusion on MNIST-M and SVHN", report_p1.p1_part),
    "p2": ("P2: DDIM on the face UNet", report_p2.p2_part),
    "p3_zeroshot": ("P3: CLIP zero-shot classification", report_p3.p3_zeroshot_part),
    "p3_ti": ("P3: textual inversion", report_p3.p3_ti_part),
    "p3_multi": ("P3: several concepts, textual inversion vs Custom Diffusion", report_p3.p3_multi_part),
}


def run_part(name, context):
    """Run one part, its scripts' output into OUT/logs/<name>.log; a missing prerequisite becomes a skip line."""
    title, build = PARTS[name]
    log_path = context.out / "logs" / f"{name}.log"
    log = io.StringIO()
    start = time.perf_counter()
    markdown, reason = "", ""
    try:
        with contextlib.redirect_stdout(log):
            markdown = build(context)
        status = "done"
    except Hw2Error as err:
        status, reason = "skipped", str(err)
        log.write(f"skipped: {reason}\n")
    except (Exception, SystemExit) as err:  # a bug, not a user's problem: keep going, record it, exit 1 at the end
        status, reason = "failed", f"{type(err).__name__}: {err}"
        log.write(traceback.format_exc())
    seconds = time.perf_counter() - start
    atomic_write_text(log_path, log.getvalue())
    line = {"done": f"done in {seconds:.1f} s", "skipped": f"skipped: {reason}",
            "failed": f"FAILED ({reason}); traceback in {log_path}"}[status]
    print(f"{title}: {line}", file=context.console, flush=True)
    return PartResult(name, title, status, reason, seconds, markdown)


def header(context, results, command, total_seconds):
    """The "what was run" tables: data world, mode, seed, device, each part's result and time, models and hashes."""
    if not context.data.exists():
        world = "not found"
    elif context.toy:
        marker = json.loads((find_toy_root(context.data) / TOY_MARKER).read_text(encoding="utf-8"))
        world = (f"toy world (built by toy_data.py, seed {marker.get('seed')}): its numbers check the code, not the "
                 f"methods")
    else:
        world = "real (the course's hw2_data)"
    device = get_device(context.args.device)
    settings = [["command", code(command)], ["data", f"`{context.data}`, {world}"],
                ["mode", "quick (few sampling steps: a preview)" if context.args.quick else "full"],
                ["seed", context.args.seed], ["device", f"{device} (torch {torch.__version__})"],
                ["total wall time", f"{total_seconds:.1f} s"]]
    parts = [[result.title, {"done": "done", "skipped": f"skipped: {result.reason}",
                             "failed": f"**failed**: {result.reason} (see `logs/{result.name}.log`)"}[result.status],
              f"{result.seconds:.1f} s"] for result in results]
    models = []
    for used_by, where in dict.fromkeys(context.models):  # in order of first use, without repeats
        digest = file_digest(where)
        models.append([used_by, f"`{where}`", f"`{digest}`" if digest else "-"])
    lines = ["## What was run", "", table(["", ""], settings), "", table(["part", "result", "wall time"], parts), ""]
    if models:
        lines += [table(["used by", "model or checkpoint", f"sha256 (first {HASH_LENGTH})"], models), ""]
    return "\n".join(lines)


def render(context, results, command, total_seconds):
    lines = ["# hw2 report", "", "Regenerated by `make_report.py`; each part's script output is in `logs/`.", "",
             header(context, results, command, total_seconds)]
    for result in results:
        lines += [f"## {result.title}", ""]
        if result.status == "done":
            lines += [result.markdown]
        elif result.status == "skipped":
            lines += [f"**Skipped:** {result.reason}.", ""]
        else:
            lines += [f"**Failed:** {result.reason}; the traceback is in `logs/{result.name}.log`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def parse_parts(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise Hw2Error(f"--parts {text!r}: use a comma-separated subset of {', '.join(PARTS)}")
    return [name for name in PARTS if name in names]


def main(argv=None):
    args = build_parser().parse_args(argv)
    parts = parse_parts(args.parts)
    get_device(args.device)  # an unusable --device is one line, before any work
    data, out = Path(args.data), Path(args.out)
    toy = find_toy_root(data) is not None
    if toy:
        announce_toy_world(data)
    context = Context(args=args, settings=QUICK if args.quick else FULL, data=data, out=out, toy=toy,
                      console=sys.stdout)
    command = shlex.join(["python", "make_report.py", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    results = [run_part(name, context) for name in parts]
    report = out / "report.md"
    atomic_write_text(report, render(context, results, command, time.perf_counter() - start))
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    print(f"Wrote {report}: {counts['done']} part(s) done, {counts['skipped']} skipped, {counts['failed']} failed.")
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        raise Hw2Error(f"part(s) {', '.join(failed)} failed; the tracebacks are in {out / 'logs'}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default="hw2_data",
                        help="The hw2_data folder (real, or a toy world from toy_data.py) (default: hw2_data).")
    parser.add_argument("--out", type=str, default="report",
                        help="Folder for report.md, its figures and the logs (default: report).")
    parser.add_argument("--quick", action="store_true",
                        help="Very few sampling steps everywhere; on a toy world also train the short P1 model, "
                             "evaluator and embeddings the report needs, inside --out (default: off).")
    parser.add_argument("--parts", type=str, default=",".join(PARTS),
                        help=f"Comma-separated parts to run, of {', '.join(PARTS)} (default: all).")
    parser.add_argument("--seed", type=int, default=0, help="Seed passed to every script (default: 0).")
    parser.add_argument("--device", type=str, default=None,
                        help="Device for every script: cpu, cuda, cuda:N or mps (default: the best available).")
    parser.add_argument("--p1-ckpt", type=str, default=None,
                        help=f"P1 diffusion checkpoint (default: the newest ddpm*.safetensors in "
                             f"{p1_train.DEFAULT_OUT}, as p1_inference.py picks it).")
    parser.add_argument("--p1-evaluator", type=str, default=None,
                        help=f"P1 evaluator checkpoint (default: {Path(p1_train.DEFAULT_OUT) / p1_eval.EVALUATOR_NAME}"
                             f"; the accuracy table is skipped without one).")
    parser.add_argument("--p1-bench", type=str, default=report_p1.P1_DEFAULT_BENCH,
                        help=f"Markdown written by `benchmarks/p1_bench.py --report`, shown as the guidance/sampler "
                             f"table when it exists (default: {report_p1.P1_DEFAULT_BENCH}).")
    parser.add_argument("--face-unet", type=str, default=None,
                        help="P2 face UNet state_dict (default: DATA/face/UNet.pt).")
    parser.add_argument("--clip-model", type=str, default=None,
                        help="open_clip model name or config JSON for zero-shot (default: p3_clip_zeroshot.py's).")
    parser.add_argument("--clip-pretrained", type=str, default=None,
                        help="open_clip pretrained tag or weights file for zero-shot (default: p3_clip_zeroshot.py's).")
    parser.add_argument("--sd-model", type=str, default=None,
                        help="Stable Diffusion v1.4 .ckpt, diffusers folder or hub id (default: "
                             "p3_textual_inversion.py's: the tiny toy model on a toy world, else the hub id).")
    parser.add_argument("--ti-embeds", type=str, default=None,
                        help=f"Folder (or file) of learned_embeds.safetensors (default: "
                             f"{p3_textual_inversion.DEFAULT_EMBEDS_DIR} in this repository; on a toy world with "
                             f"--quick, short embeddings trained into --out).")
    parser.add_argument("--ti-clip", type=str, default=None,
                        help="transformers CLIP for the textual-inversion scores (default: p3_textual_inversion.py's).")
    parser.add_argument("--cd-weights", type=str, default=None,
                        help=f"Folder written by `p3_custom_diffusion.py train` (default: "
                             f"{p3_custom_diffusion.DEFAULT_WEIGHTS_DIR} in this repository; on a toy world with "
                             f"--quick, short weights trained into --out).")
    return parser


if __name__ == "__main__":
    run_cli(main)
