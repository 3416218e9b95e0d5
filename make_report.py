"""Regenerate the whole hw2 report, every figure and number, from the data and checkpoints at hand.

    python make_report.py --data hw2_data --out report
    python make_report.py --data hw2_data --out report --quick      # toy world: tiny settings, seconds per part

Writes `OUT/report.md` with its figures beside it (OUT/p1, OUT/p2, OUT/p3_zeroshot, OUT/p3_ti, OUT/p3_multi) and the
output of each part's scripts in OUT/logs/<part>.log. Every number and image comes from the problem scripts' own
functions (p1_inference, p1_eval, p2_ddim, p2_interpolate, p3_clip_zeroshot, p3_textual_inversion,
p3_custom_diffusion), run in this process.

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
import csv
import hashlib
import io
import json
import re
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import custom_diffusion_io
import p1_eval
import p1_inference
import p1_train
import p2_ddim
import p2_interpolate
import p3_clip_zeroshot
import p3_concepts
import p3_custom_diffusion
import p3_score
import p3_textual_inversion
import sd_v1
from p1_model import DATASETS, NUM_DIGITS
from utils import (
    TOY_MARKER,
    Hw2Error,
    announce_toy_world,
    atomic_write_text,
    find_toy_root,
    get_device,
    labelled_grid,
    load_checkpoint,
    load_rgb,
    run_cli,
    save_grid,
    save_pil,
)

HASH_LENGTH = 12  # hex digits of sha256 shown in the header
HASH_CHUNK = 1 << 20
P1_DEFAULT_BENCH = "BENCH_p1.md"  # where p1_bench.py's README example writes its --report
WORST_CLASSES = 10
TI_GRID_IMAGES = 4  # images per prompt in the textual-inversion grids
MULTI_PROMPTS = ("A {0} next to a {1}.", "A {0} in the style of {1}.")  # {0}, {1}: input.json's first two tokens


@dataclass(frozen=True)
class Settings:
    """Sampler steps per part (None: the script's own default) and the tiny training runs of --quick."""

    p1_steps: int = None
    p2_steps: int = None
    ti_steps: int = None
    p1_train: tuple = ()
    p1_evaluator_epochs: int = 0
    ti_train: tuple = ()
    zeroshot_workers: int = None


FULL = Settings()
QUICK = Settings(p1_steps=5, p2_steps=5, ti_steps=2, zeroshot_workers=0,
                 # seconds on 2 cores: one epoch over 64 images per dataset, no sample grid
                 p1_train=("--epochs", "1", "--limit", "64", "--batch-size", "32", "--grid-every", "0"),
                 p1_evaluator_epochs=1, ti_train=("--steps", "2", "--batch-size", "1"))


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


def figure(out, path, caption):
    """Markdown for an image under OUT, by its relative path."""
    return f"![{caption}]({Path(path).relative_to(out).as_posix()})"


def table(header, rows):
    """A markdown table from a header and rows of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def code(text):
    """Text as a markdown code span: prompts hold "<new1>", which markdown would take for an HTML tag."""
    return f"`{text}`"


def percent(correct, total):
    return f"{100 * correct / total:.2f}% ({correct}/{total})"


def require(path, what, fix):
    """Raise the one-line "missing prerequisite" error unless `path` exists."""
    if not Path(path).exists():
        raise Hw2Error(f"{what} not found at {path}: {fix}")
    return Path(path)


def skipped_step(context, what, reason):
    """One step of a part cannot run: one line on the console, and the markdown that says so."""
    context.say(f"{what}: skipped: {reason}")
    return [f"**Skipped:** {reason}.", ""]


def load_images(paths):
    """Image files as one N x 3 x H x W tensor in [-1, 1] (the range utils.save_grid takes)."""
    arrays = [np.asarray(load_rgb(path)) for path in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ------------------------------------------------------------------------------------------------- P1


def p1_checkpoint(context):
    """--p1-ckpt, else a short one trained into OUT on a toy world with --quick, else p1_inference's own lookup."""
    args = context.args
    if args.p1_ckpt:
        return require(args.p1_ckpt, "--p1-ckpt", "pass the ddpm*.safetensors written by p1_train.py")
    if context.toy and args.quick:
        folder = context.out / "p1" / "quick_checkpoint"
        context.say(f"P1: training a short toy checkpoint into {folder} (--quick on a toy world).")
        p1_train.main(["--data", str(context.data / "digits"), "--out", str(folder), *context.settings.p1_train,
                       *context.seed_flag(), *context.device_flag()])
        return folder / p1_train.CHECKPOINT_NAME
    try:
        return p1_inference.find_latest_checkpoint(p1_train.DEFAULT_OUT)
    except Hw2Error:
        raise Hw2Error(f"no P1 checkpoint (ddpm*.safetensors) in {p1_train.DEFAULT_OUT}: train one with `python "
                       f"p1_train.py --data {context.data / 'digits'}` or pass --p1-ckpt (on a toy world, --quick "
                       f"trains a short one itself)") from None


def p1_evaluator(context):
    """--p1-evaluator, else one trained into OUT on a toy world with --quick, else p1_eval's default; None if none."""
    args = context.args
    if args.p1_evaluator:
        return require(args.p1_evaluator, "--p1-evaluator", "pass the file written by `python p1_eval.py train`")
    if context.toy and args.quick:
        folder = context.out / "p1" / "quick_checkpoint"
        context.say(f"P1: training the evaluator for {context.settings.p1_evaluator_epochs} epoch(s) into {folder}.")
        p1_eval.main([*context.device_flag(), "train", "--data", str(context.data / "digits"), "--out", str(folder),
                      "--epochs", str(context.settings.p1_evaluator_epochs), *context.seed_flag()])
        return folder / p1_eval.EVALUATOR_NAME
    default = Path(p1_train.DEFAULT_OUT) / p1_eval.EVALUATOR_NAME
    return default if default.is_file() else None


def p1_part(context):
    out = context.out / "p1"
    ckpt = p1_checkpoint(context)
    context.model("P1 diffusion model", ckpt)
    samples = out / "samples"
    p1_inference.main([str(samples), "--ckpt", str(ckpt), "--figures", str(out),
                       *context.steps_flag(context.settings.p1_steps), *context.seed_flag(), *context.device_flag()])
    grids = [out / f"p1_grid_{name}.png" for name in DATASETS]
    strips = [out / f"p1_reverse_{name}.png" for name in DATASETS]
    steps = context.settings.p1_steps or p1_inference.build_parser().get_default("steps")
    lines = [f"Checkpoint `{ckpt}`; {NUM_DIGITS * p1_inference.PER_DIGIT} images per dataset sampled by "
             f"`p1_inference.py` (DDIM, {steps} steps, the checkpoint's guidance weight, seed {context.args.seed}) "
             f"into `{samples.relative_to(context.out)}/`.", ""]
    for name, grid, strip in zip(DATASETS, grids, strips):
        lines += [f"### {p1_eval.DISPLAY[name]}", "", "Row = digit 0-9, column = a different noise x_T.", "",
                  figure(context.out, grid, f"{p1_eval.DISPLAY[name]} 10x10 grid"), "",
                  f"The reverse process of the first \"0\" ({p1_eval.DISPLAY[name]}), x_T to x_0, labelled with t:", "",
                  figure(context.out, strip, f"{p1_eval.DISPLAY[name]} reverse process"), ""]

    lines += ["### Evaluator accuracy", ""]
    evaluator = p1_evaluator(context)
    if evaluator is None:
        reason = (f"no evaluator at {Path(p1_train.DEFAULT_OUT) / p1_eval.EVALUATOR_NAME}: train it with `python "
                  f"p1_eval.py train --data {context.data / 'digits'}` or pass --p1-evaluator")
        lines += skipped_step(context, "P1 evaluator accuracy", reason)
    else:
        context.model("P1 evaluator", evaluator)
        score_args = p1_eval.build_parser().parse_args(["score", str(samples), "--evaluator", str(evaluator)])
        accs = p1_eval.score_command(score_args, get_device(context.args.device))
        val_acc = load_checkpoint(evaluator).get("val_acc", {})  # what `p1_eval.py train` measured on val.csv
        rows = [[p1_eval.DISPLAY[name], f"{acc:.4f}", f"{val_acc[name]:.4f}" if name in val_acc else "-"]
                for name, acc in zip(DATASETS, accs)]
        rows.append(["mean", f"{sum(accs) / len(accs):.4f}", ""])
        lines += [f"Evaluator `{evaluator}` on the {NUM_DIGITS * p1_inference.PER_DIGIT} generated images of each "
                  f"dataset (the label is the file name's first character, as the grader reads it), beside the "
                  f"evaluator's own accuracy on the real held-out images:", "",
                  table(["dataset", "generated images", "evaluator on real val images"], rows), ""]

    lines += ["### Accuracy versus guidance weight and sampler", ""]
    bench = Path(context.args.p1_bench)
    if bench.is_file():
        text = bench.read_text(encoding="utf-8").strip()
        lines += [f"From `{bench}` (written by `benchmarks/p1_bench.py --report`; its heading names the checkpoint "
                  f"and machine):", "", re.sub(r"^#+ ", "#### ", text, flags=re.M), ""]
    else:
        reason = (f"no P1 benchmark results at {bench}: run `python benchmarks/p1_bench.py --ckpt {ckpt} --report "
                  f"{bench}`")
        lines += skipped_step(context, "P1 guidance/sampler table", reason)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- P2


def p2_part(context):
    out = context.out / "p2"
    face = context.data / "face"
    noise = require(face / "noise", "the face noise folder", "download the data with `bash hw2_download.sh`")
    unet = require(context.args.face_unet or face / "UNet.pt", "the face UNet", "download the data or pass --face-unet")
    context.model("P2 face UNet", unet)
    gt = face / "GT"
    faces = out / "faces"
    steps = context.steps_flag(context.settings.p2_steps)
    p2_ddim.main([str(noise), str(faces), str(unet), "--figures", str(out), *steps, *context.seed_flag(),
                  *context.device_flag()])
    interpolation = out / "interpolation"
    p2_interpolate.main([str(noise), str(interpolation), str(unet), *steps, *context.device_flag()])
    eta_grid, slerp, linear = out / "eta_grid.png", interpolation / "slerp.png", interpolation / "linear.png"
    num_steps = context.settings.p2_steps or p2_ddim.DEFAULT_STEPS
    lines = [
        f"DDIM with {num_steps} steps on `{unet}`, images normalised per image like the course's ground truth.", "",
        "### Faces for different eta", "",
        f"Rows eta = {', '.join(f'{eta:g}' for eta in p2_ddim.FIGURE_ETAS)}; columns the noises 00.pt-"
        f"{p2_ddim.FIGURE_NOISES - 1:02d}.pt. eta = 0 is deterministic DDIM; eta = 1 gives DDPM's posterior variance; "
        "larger eta adds more fresh noise at each step, so the image drifts away from the deterministic one.", "",
        figure(context.out, eta_grid, "eta grid"), "",
        "### Interpolation between 00.pt and 01.pt", "",
        f"alpha = {', '.join(f'{alpha:.1f}' for alpha in p2_interpolate.ALPHAS)}. Slerp keeps the norm a Gaussian "
        "sample of this size has; linear interpolation shrinks it in the middle (two independent N(0, I) noises "
        "averaged have about 0.71 of a sample's norm), off the distribution the model was trained on, which gives "
        "washed-out, blurry middle frames.", "",
        figure(context.out, slerp, "slerp strip"), "", figure(context.out, linear, "linear strip"), "",
        "### MSE against the ground truth (eta = 0, 0-255 scale)", ""]
    if gt.is_dir():
        names = [path.stem for path in p2_ddim.noise_paths(noise)]
        references = p2_ddim.load_ground_truth(gt, names, np.asarray(load_rgb(faces / f"{names[0]}.png")).shape[:2])
        errors = [p2_ddim.mse_255(np.asarray(load_rgb(faces / f"{name}.png")), reference)
                  for name, reference in zip(names, references)]
        rows = [[f"{name}.png", f"{error:.4f}"] for name, error in zip(names, errors)]
        rows.append(["mean", f"{np.mean(errors):.4f}"])
        if num_steps != p2_ddim.DEFAULT_STEPS:
            lines += [f"These images took {num_steps} steps, not the {p2_ddim.DEFAULT_STEPS} the ground truth was made "
                      f"with, so the errors are large.", ""]
        lines += [table(["image", "MSE"], rows), ""]
    else:
        reason = f"no ground-truth folder {gt}"
        lines += skipped_step(context, "P2 MSE table", reason)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- P3 zero-shot


def p3_zeroshot_part(context):
    args = context.args
    data = require(context.data / "clip_zeroshot", "the clip_zeroshot folder", "download the data")
    out = context.out / "p3_zeroshot"
    runs = {}
    for prompts in ("single", "ensemble"):
        argv = ["--data", str(data), "--prompts", prompts, "--out", str(out / prompts), *context.seed_flag(),
                *context.device_flag()]
        argv += ["--model", args.clip_model] if args.clip_model else []
        argv += ["--pretrained", args.clip_pretrained] if args.clip_pretrained else []
        if context.settings.zeroshot_workers is not None:
            argv += ["--workers", str(context.settings.zeroshot_workers)]
        p3_clip_zeroshot.main(argv)
        runs[prompts] = json.loads((out / prompts / "metrics.json").read_text(encoding="utf-8"))
    single = runs["single"]
    weights = single["pretrained"]
    context.model(f"P3 CLIP ({single['model']})", weights if Path(weights).is_file() else f"open_clip tag {weights}")

    # the worst classes, with their most frequent confusion, from the single-prompt predictions
    id2label = p3_clip_zeroshot.read_id2label(data)
    names = list(id2label.values())
    index = {name: i for i, name in enumerate(names)}
    with open(out / "single" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = torch.tensor([index[row["label"]] for row in rows])
    predictions = torch.tensor([index[row["prediction"]] for row in rows])
    worst = p3_clip_zeroshot.per_class_rows(predictions, labels, names)[:WORST_CLASSES]
    worst_rows = [[name, f"{100 * right / total:.1f}%", f"{right}/{total}",
                   f"{confusion[0]} ({confusion[1]})" if confusion else "-"] for name, right, total, confusion in worst]

    cases = out / "single" / "cases.png"
    accuracy_rows = [[prompts, f"{len(run['templates'])}", percent(run["correct"], run["total"]),
                      f"{100 * run['top5_accuracy']:.2f}%"] for prompts, run in runs.items()]
    lines = [
        f"Model {single['model']} (`{weights}`). CLIP encodes each image and one prompt per class (\"a photo of a "
        "{class}.\") into unit vectors; an image's class is the one whose prompt has the highest cosine similarity. "
        f"The ensemble averages the text vectors of CLIP's {len(runs['ensemble']['templates'])} CIFAR-100 templates "
        f"per class.", "",
        table(["prompts", "templates", "accuracy", "top-5"], accuracy_rows), "",
        f"### The {len(worst)} worst classes (single prompt)", "",
        table(["class", "accuracy", "correct/total", "most often mistaken for"], worst_rows), "",
        "### 5 successes and 5 failures (single prompt)", "",
        figure(context.out, cases, "zero-shot successes and failures"), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- textual inversion


def ti_embeddings(context, input_json, model):
    """Folder of learned_embeds files: trained into OUT on a toy world with --quick, else --ti-embeds."""
    if context.toy and context.args.quick and not context.args.ti_embeds:
        folder = context.out / "p3_ti" / "quick_embeds"
        context.say(f"P3 textual inversion: training toy embeddings into {folder} (--quick on a toy world).")
        p3_textual_inversion.main(["train", "--input-json", str(input_json), "--model", str(model), "--out",
                                   str(folder), *context.settings.ti_train, *context.seed_flag(),
                                   *context.device_flag()])
        return folder
    folder = Path(context.args.ti_embeds or Path(__file__).resolve().parent / p3_textual_inversion.DEFAULT_EMBEDS_DIR)
    if not (folder.is_file() or folder.is_dir() and any(folder.rglob(p3_textual_inversion.EMBEDS_FILE))):
        raise Hw2Error(f"no learned embeddings ({p3_textual_inversion.EMBEDS_FILE}) under {folder}: train them with "
                       f"`python p3_textual_inversion.py train --input-json {input_json} --out {folder}` or pass "
                       f"--ti-embeds")
    return folder


def image_number(path):
    """The image index i of a generated file `<stem>_<i>.png`."""
    return int(path.stem.rsplit("_", 1)[1])


def grid_of_prompts(folders, path, per_prompt=TI_GRID_IMAGES):
    """One row per prompt folder: its images 0 .. per_prompt - 1."""
    paths = [image for folder in folders
             for image in sorted(p3_concepts.list_images(folder), key=image_number)[:per_prompt]]
    save_grid(load_images(paths), path, nrow=per_prompt)
    return path


def multi_prompt(template, tokens):
    """A --multi-prompt template with {0} and {1} replaced by the first two concepts' tokens."""
    try:
        return template.format(*tokens[:2])
    except (IndexError, KeyError, ValueError) as err:
        raise Hw2Error(f"--multi-prompt {template!r} must use only {{0}} and {{1}} (the tokens {tokens[0]} and "
                       f"{tokens[1]}) and no other braces") from err


def p3_ti_part(context):
    args = context.args
    input_json = require(context.data / "textual_inversion" / "input.json", "input.json", "download the data")
    entries = p3_concepts.read_input_json(input_json, p3_concepts.INPUT_FIELDS)
    tokens = [entry["token_name"] for entry in entries.values()]
    multi_prompts = []  # checked before any work; none when input.json has a single concept
    if len(tokens) >= 2:
        multi_prompts = [multi_prompt(template, tokens) for template in args.multi_prompt or MULTI_PROMPTS]
    model = args.sd_model or sd_v1.default_model(input_json)
    context.model("P3 Stable Diffusion", model if Path(model).exists() else f"hub id {model}")
    embeds = ti_embeddings(context, input_json, model)
    for path in p3_textual_inversion.find_embeds([embeds]):
        context.model("P3 learned embeddings", path)
    out = context.out / "p3_ti"
    generated = out / "generated"
    common = [*context.steps_flag(context.settings.ti_steps), *context.seed_flag(), *context.device_flag()]
    p3_textual_inversion.main(["generate", str(input_json), str(generated), str(model), "--embeds", str(embeds),
                               *common])
    score_argv = ["score", str(input_json), str(generated), *context.device_flag()]
    score_argv += ["--clip", args.ti_clip] if args.ti_clip else []
    jobs = p3_concepts.output_jobs(entries, generated, None)  # (folder, stem, prompt, seed index)
    scores = p3_textual_inversion.main(score_argv)  # one PromptScore per (concept, prompt), in the jobs' order
    score_rows = [[row.concept, code(prompt), f"{row.clip_i:.2f}", row.baseline_i, f"{row.clip_t:.2f}",
                   row.baseline_t, "PASS" if row.passed else "FAIL"]
                  for (_, _, prompt, _), row in zip(jobs, scores)]
    grid = grid_of_prompts([folder for folder, _, _, _ in jobs], out / "p3_ti_grid.png")

    lines = [f"Stable Diffusion `{model}` with the learned embeddings under `{embeds}`; "
             f"images written by `p3_textual_inversion.py generate` to `{generated.relative_to(context.out)}/`.", "",
             "### CLIP scores against the baselines", "",
             f"The grader's formula: of the {p3_concepts.GRADER_IMAGES} images per prompt, the "
             f"{p3_score.GRADER_TOP_K} with the highest CLIP-I + {p3_score.GRADER_TEXT_WEIGHT} "
             f"CLIP-T; their mean CLIP-I (against the concept's photos) and CLIP-T (against `prompt_4_clip_eval`).", "",
             table(["concept", "prompt", "CLIP-I", "baseline", "CLIP-T", "baseline", "result"], score_rows), "",
             f"### {TI_GRID_IMAGES} images per prompt", "",
             "One row per prompt, in the table's order.", "", figure(context.out, grid, "generated images"), "",
             "### Several concepts in one image", ""]
    if not multi_prompts:
        reason = f"{input_json} holds only {len(tokens)} concept; multi-concept prompts need two"
        lines += skipped_step(context, "P3 multi-concept images", reason)
    else:
        multi = out / "multi"
        p3_textual_inversion.main(["generate", str(input_json), str(multi), str(model), "--embeds", str(embeds),
                                   "--num-images", str(TI_GRID_IMAGES), *[x for p in multi_prompts
                                                                          for x in ("--prompt", p)], *common])
        multi_jobs = p3_concepts.output_jobs(entries, multi, multi_prompts)
        multi_grid = grid_of_prompts([folder for folder, _, _, _ in multi_jobs], out / "p3_ti_multi.png")
        lines += ["One row per prompt: " + "; ".join(f"{k + 1}. {code(p)}" for k, p in enumerate(multi_prompts)) + ".",
                  "", figure(context.out, multi_grid, "multi-concept images"), "",
                  "A method built for several concepts is Custom Diffusion (Kumari et al., CVPR 2023): it fine-tunes "
                  "only the key and value projections of the UNet's cross-attention layers together with a new "
                  "modifier token, uses about 200 real regularization images with similar captions against "
                  "forgetting, and combines concepts by training on both concepts' images jointly or by merging two "
                  "separately tuned sets of key/value weights with a closed-form constrained optimization.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------- several concepts: TI vs Custom Diffusion

CAT_FOLDER, CAT_TOKEN, CAT_WORD = "cat", "<cat1>", "cat"  # the provided cat photos, their token and class word
# {0}, {1}: input.json's first two tokens (the dog and the style on the real data); {2}: the cat's token
COMPARE_PROMPTS = ("A {0} next to a {2}.", "A {0} next to a {2} in the style of {1}.", "A {2} sitting on the {0}.")
COMPARE_IMAGES = 4  # images per prompt and method, the same seeds for both methods
# where the README trains extra textual-inversion concepts (outside checkpoints/p3_ti, which the grader's run loads)
TI_EXTRA_DIR = Path(__file__).resolve().parent / "checkpoints" / "p3_ti_extra"
CD_QUICK_TRAIN = ("--steps", "2", "--batch-size", "1", "--num-class-images", "2")  # seconds on the toy world


def compare_ti_embeddings(context, input_json, cat_dir, model):
    """--embeds for textual inversion: the input.json concepts' files and one that provides CAT_TOKEN."""
    folder = ti_embeddings(context, input_json, model)
    if context.toy and context.args.quick and not context.args.ti_embeds:
        cat = context.out / "p3_multi" / "quick_ti_cat"
        p3_textual_inversion.main(["train", str(cat_dir), "--token", CAT_TOKEN, "--init-token", CAT_WORD, "--model",
                                   str(model), "--out", str(cat), *context.settings.ti_train, *context.seed_flag(),
                                   *context.device_flag()])
        return [folder, cat]
    folders = [folder, *([TI_EXTRA_DIR] if TI_EXTRA_DIR.is_dir() else [])]
    if not any(CAT_TOKEN in load_file(path) for path in p3_textual_inversion.find_embeds(folders)):
        raise Hw2Error(f"no learned embedding of {CAT_TOKEN} under {' or '.join(map(str, folders))}: train it with "
                       f"`python p3_textual_inversion.py train {cat_dir} --token \"{CAT_TOKEN}\" --init-token "
                       f"{CAT_WORD} --out {TI_EXTRA_DIR / CAT_FOLDER}`")
    return folders


def compare_cd_weights(context, input_json, cat_dir, model):
    """The Custom Diffusion folder: trained into OUT on a toy world with --quick, else --cd-weights."""
    concepts = ["--input-json", str(input_json), "--concept", str(cat_dir), CAT_TOKEN, CAT_WORD]
    if context.toy and context.args.quick and not context.args.cd_weights:
        folder = context.out / "p3_multi" / "quick_cd"
        context.say(f"P3 Custom Diffusion: training toy weights into {folder} (--quick on a toy world).")
        p3_custom_diffusion.main(["train", *concepts, "--model", str(model), "--out", str(folder), *CD_QUICK_TRAIN,
                                  *context.seed_flag(), *context.device_flag()])
        return folder
    folder = Path(context.args.cd_weights or p3_custom_diffusion.DEFAULT_WEIGHTS_DIR)
    if not (folder / custom_diffusion_io.WEIGHTS_FILE).is_file():
        raise Hw2Error(f"no Custom Diffusion weights in {folder}: train them with `python p3_custom_diffusion.py "
                       f"train {shlex.join(concepts)} --out {folder}` or pass --cd-weights")
    return folder


def concept_scores(model, processor, folder, eval_prompt, references, device):
    """Mean CLIP-T of a prompt folder's images against `eval_prompt`, and mean CLIP-I against each concept's photos
    ({token: features}), by the grader's per-image formulas (p3_score), over all the folder's images."""
    images = p3_score.image_features(model, processor, p3_concepts.list_images(folder), device)
    text = p3_score.text_features(model, processor, eval_prompt, device)
    clip_t, clip_i = None, {}
    for token, photos in references.items():
        per_image_i, per_image_t = p3_score.clip_scores(images, photos, text)
        clip_i[token] = per_image_i.mean().item()
        clip_t = per_image_t.mean().item()  # the same against every concept's photos
    return clip_t, clip_i


def p3_multi_part(context):
    args = context.args
    input_json = require(context.data / "textual_inversion" / "input.json", "input.json", "download the data")
    cat_dir = require(input_json.parent / CAT_FOLDER, "the cat photos", "download the data")
    entries = p3_concepts.read_input_json(input_json, p3_concepts.INPUT_FIELDS)
    if len(entries) < 2:
        raise Hw2Error(f"{input_json} holds only {len(entries)} concept; the comparison needs two and the cat")
    folders = {entry["token_name"]: input_json.parent / name for name, entry in list(entries.items())[:2]}
    folders[CAT_TOKEN] = cat_dir
    words = {entry["token_name"]: entry["src_image"] for entry in list(entries.values())[:2]} | {CAT_TOKEN: CAT_WORD}
    prompts = [template.format(*words) for template in COMPARE_PROMPTS]
    model = args.sd_model or sd_v1.default_model(input_json)
    context.model("P3 Stable Diffusion", model if Path(model).exists() else f"hub id {model}")
    embeds = compare_ti_embeddings(context, input_json, cat_dir, model)
    weights = compare_cd_weights(context, input_json, cat_dir, model)
    context.model("P3 Custom Diffusion weights", weights / custom_diffusion_io.WEIGHTS_FILE)

    out = context.out / "p3_multi"
    common = ["--num-images", str(COMPARE_IMAGES), *[x for p in prompts for x in ("--prompt", p)],
              *context.steps_flag(context.settings.ti_steps), *context.seed_flag(), *context.device_flag()]
    p3_textual_inversion.main(["generate", str(input_json), str(out / "ti"), str(model), "--embeds",
                               *map(str, embeds), *common])
    p3_custom_diffusion.main(["generate", str(input_json), str(out / "cd"), str(model), "--weights", str(weights),
                              *common])
    methods = {"TI": out / "ti", "CD": out / "cd"}
    jobs = {name: p3_concepts.output_jobs(entries, folder, prompts) for name, folder in methods.items()}

    tiles, labels = [], []
    for k in range(len(prompts)):
        for name in methods:
            paths = sorted(p3_concepts.list_images(jobs[name][k][0]), key=image_number)
            tiles.append([np.asarray(load_rgb(path)) for path in paths])
            labels.append(f"{k + 1} {name}")
    grid = out / "p3_multi_grid.png"
    save_pil(labelled_grid(tiles, labels, [f"image {i}" for i in range(COMPARE_IMAGES)]), grid)

    toy_root = find_toy_root(input_json)
    clip = args.ti_clip or (str(toy_root / p3_score.TOY_CLIP) if toy_root is not None else p3_score.DEFAULT_CLIP)
    context.model("P3 CLIP scorer", clip)
    device = get_device(args.device)
    scorer, processor = p3_score.load_clip(clip)
    scorer.to(device)
    references = {token: p3_score.image_features(scorer, processor, p3_concepts.list_images(folder), device)
                  for token, folder in folders.items()}
    rows = []
    for k, prompt in enumerate(prompts):
        eval_prompt = prompt
        for token, word in words.items():
            eval_prompt = eval_prompt.replace(token, word)
        present = {token: features for token, features in references.items() if token in prompt}
        for name in methods:
            clip_t, clip_i = concept_scores(scorer, processor, jobs[name][k][0], eval_prompt, present, device)
            rows.append([k + 1, name, code(prompt), code(eval_prompt), f"{clip_t:.2f}",
                         *[f"{clip_i[token]:.2f}" if token in clip_i else "-" for token in words]])

    label = ("**Toy numbers**: tiny random models and a few training steps; they check the code, not the methods."
             if context.toy else "")
    lines = [f"The same {len(prompts)} prompts, each generated by textual inversion (TI: one embedding per concept, "
             f"learned separately; files under `{', '.join(map(str, embeds))}`) and by Custom Diffusion (CD: the "
             f"concepts' tokens and every cross-attention W_k, W_v trained jointly, with prior preservation; "
             f"`{weights}`), {COMPARE_IMAGES} images each from the same seeds ({context.args.seed}).", "",
             "Prompts: " + "; ".join(f"{k + 1}. {code(p)}" for k, p in enumerate(prompts)) + ".", "",
             "Rows: prompt number and method; image i of a prompt starts from the same noise for both methods.", "",
             figure(context.out, grid, "textual inversion vs Custom Diffusion"), "",
             f"Mean over the {COMPARE_IMAGES} images of each prompt and method (CLIP `{clip}`): CLIP-T against the "
             "prompt with each token written as its concept's word, and CLIP-I against the photos of each concept "
             "the prompt names (the grader's per-image formulas, without its top-5 selection).", ""]
    lines += [label, ""] if label else []
    lines += [table(["#", "method", "prompt", "scored text", "CLIP-T", *[f"CLIP-I {code(t)}" for t in words]], rows),
              ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report

PARTS = {
    "p1": ("P1: conditional diffusion on MNIST-M and SVHN", p1_part),
    "p2": ("P2: DDIM on the face UNet", p2_part),
    "p3_zeroshot": ("P3: CLIP zero-shot classification", p3_zeroshot_part),
    "p3_ti": ("P3: textual inversion", p3_ti_part),
    "p3_multi": ("P3: several concepts, textual inversion vs Custom Diffusion", p3_multi_part),
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
    parser.add_argument("--p1-bench", type=str, default=P1_DEFAULT_BENCH,
                        help=f"Markdown written by `benchmarks/p1_bench.py --report`, shown as the guidance/sampler "
                             f"table when it exists (default: {P1_DEFAULT_BENCH}).")
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
    parser.add_argument("--multi-prompt", type=str, action="append", default=None,
                        help="A multi-concept prompt, repeatable; {0} and {1} stand for input.json's first two tokens "
                             f"(default: {' and '.join(repr(p) for p in MULTI_PROMPTS)}).")
    return parser


if __name__ == "__main__":
    run_cli(main)
