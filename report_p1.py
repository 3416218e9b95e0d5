"""The report's P1 part: grids and reverse processes, evaluator accuracy, the guidance/sampler table, and per set
the accuracy-diversity figure: evaluator accuracy against FD_eval over the guidance weight w."""

import io
import re
from pathlib import Path

import matplotlib

import p1_eval
import p1_inference
import p1_train
from p1_model import DATASETS, NUM_DIGITS
from report_common import figure, require, skipped_step, table
from utils import Hw2Error, atomic_write_bytes, get_device, load_checkpoint

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

P1_DEFAULT_BENCH = "outputs/p1_bench.md"  # where p1_bench.py's documented example writes its --report
# one accuracy row of p1_bench.py's table: sampler-steps | w | images | MNIST-M | SVHN | mean | FD (floor) x 2 | ...
BENCH_ROW = re.compile(r"^\| (?P<sampler>[\w+-]+-\d+) \| (?P<w>[\d.]+) \| (?P<images>\d+) \| (?P<mnistm>[\d.]+) \| "
                       r"(?P<svhn>[\d.]+) \| [\d.]+ \| (?P<fd_mnistm>[\d.]+) \((?P<floor_mnistm>[\d.]+)\) \| "
                       r"(?P<fd_svhn>[\d.]+) \((?P<floor_svhn>[\d.]+)\) \|", re.M)


def guidance_sweep(bench_text):
    """The rows of p1_bench.py's table for the (sampler, image count) run at the most guidance weights (at least
    three): (sampler name, [(w, row)] sorted by w), or (None, []) if no sampler was run at three weights."""
    groups = {}
    for row in BENCH_ROW.finditer(bench_text):
        groups.setdefault((row["sampler"], row["images"]), {})[float(row["w"])] = row
    best = max(groups, key=lambda key: len(groups[key]), default=None)
    if best is None or len(groups[best]) < 3:
        return None, []
    return best[0], sorted(groups[best].items())


def accuracy_fd_figure(sampler, sweep, name, path):
    """Accuracy (y) against FD_eval (x), one point per guidance weight, labelled with w; the dashed line is the
    floor, two halves of the real images. Written atomically, without the PNG's software tag: byte-identical."""
    fd, acc = [float(row[f"fd_{name}"]) for _, row in sweep], [float(row[name]) for _, row in sweep]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    ax.plot(fd, acc, "o-")
    ax.margins(x=0.15, y=0.1)  # room for the w labels
    for (w, _), x, y in zip(sweep, fd, acc):
        ax.annotate(f"w = {w:g}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.axvline(float(sweep[0][1][f"floor_{name}"]), linestyle="--", color="gray", label="two real halves (floor)")
    ax.set(xlabel="FD_eval to the real val images (lower: more like them)", ylabel="evaluator accuracy",
           title=f"{p1_eval.DISPLAY[name]}: {sampler}, {sweep[0][1]['images']} images per w")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def p1_checkpoint(context):
    """--p1-ckpt, else a short one trained into OUT on a toy world with --quick, else p1_inference's own lookup."""
    args = context.args
    if args.p1_ckpt:
        return require(args.p1_ckpt, "--p1-ckpt", "pass the ddpm*.safetensors written by p1_train.py")
    if context.toy and args.quick:
        folder = context.out / "p1" / "quick_checkpoint"
        context.say(f"P1: training a short toy checkpoint into {folder} (--quick on a toy world).")
        p1_train.main(["--data", str(context.data / "digits"), "--out", str(folder), *context.settings.p1_train,
                       *context.seed_flag(), *context.device_flag(), "--overwrite"])  # the report's own scratch model
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
        context.say(f"P1: training a short evaluator ({' '.join(context.settings.p1_evaluator)}) into {folder}.")
        p1_eval.main([*context.device_flag(), "train", "--data", str(context.data / "digits"), "--out", str(folder),
                      *context.settings.p1_evaluator, *context.seed_flag()])
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
    defaults = p1_inference.build_parser()
    steps = context.settings.p1_steps or defaults.get_default("steps")
    lines = [f"Checkpoint `{ckpt}`; {NUM_DIGITS * p1_inference.PER_DIGIT} images per dataset sampled by "
             f"`p1_inference.py` ({defaults.get_default('sampler')}, {steps} steps, the checkpoint's guidance "
             f"weight, seed {context.args.seed}) into `{samples.relative_to(context.out)}/`.", ""]
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
        lines += ["### Accuracy against diversity over the guidance weight", ""]
        sampler, sweep = guidance_sweep(text)
        if sampler is None:
            reason = (f"{bench} has no sampler run at three or more guidance weights with FD_eval: run `python "
                      f"benchmarks/p1_bench.py --runs dpmpp:10:0,dpmpp:10:2,dpmpp:10:5 ...`")
            lines += skipped_step(context, "P1 accuracy-diversity figure", reason)
        for name in DATASETS if sampler else ():
            path = out / f"p1_accuracy_fd_{name}.png"
            accuracy_fd_figure(sampler, sweep, name, path)
            lines += [figure(context.out, path, f"{p1_eval.DISPLAY[name]} accuracy against FD_eval"), ""]
    else:
        reason = (f"no P1 benchmark results at {bench}: run `python benchmarks/p1_bench.py --ckpt {ckpt} --report "
                  f"{bench}`")
        lines += skipped_step(context, "P1 guidance/sampler table", reason)
    return "\n".join(lines)
