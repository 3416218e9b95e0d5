"""Mutation testing of the homework's formulas: which small wrong formula would the test suite let through?

    pip install -r requirements-dev.txt
    python tools/mutation.py              # 16 min on a shared 2-core CPU (docs/testing.md); report in outputs/mutation/

mutmut (pinned in requirements-dev.txt) copies the repository into a scratch folder, rewrites each function below
into its mutants (a flipped sign, an operator or constant changed, an argument dropped...), and runs for each mutant
only the tests that call that function, from the test files in TESTS. A mutant is killed when a test fails. The
score counts the functions in FUNCTIONS only, not the plumbing around them (argparse, file checks, printing).
Each surviving mutant and why it is not worth a test is listed in docs/testing.md.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module -> the functions holding the homework's math ("Class.method" for a method)
FUNCTIONS = {
    "ddim": ["ddim_timesteps", "ddim_sigma", "ddim_step"],
    "p1_model": ["linear_beta_schedule", "cosine_beta_schedule", "make_betas", "alpha_bar_from_betas", "_at",
                 "q_sample", "v_target", "to_x0_eps", "q_posterior", "ddpm_step", "guided_output", "drop_labels",
                 "loss_weight", "diffusion_loss", "ddpm_sample", "ddim_sample", "run_sampler", "final"],
    "p2_ddim": ["linear_alpha_bar", "course_timesteps", "predict_x0", "ddim_sample_progressive", "ddim_sample",
                "minmax_normalize", "to_display", "mse_255"],
    "p3_score": ["PromptScore.passed", "passes", "clip_scores", "top_k_means"],
    "p3_training": ["diffusion_target", "denoising_loss"],
    "utils": ["_unflatten", "load_checkpoint", "load_torch_file"],
}
# the test files that exercise them; mutmut picks, per function, the tests among these that call it
TESTS = ["tests/test_p1_model.py", "tests/test_p1_loss.py", "tests/test_p1_sampling.py", "tests/test_p2_ddim.py",
         "tests/test_p3_score.py", "tests/test_p3_loss.py", "tests/test_utils.py"]
KILLED = {"killed", "timeout", "segfault"}  # a mutant that crashes or hangs the tests is caught as well


def mutant_pattern(module, function):
    """mutmut's name for every mutant of one function: module.x_name__mutmut_N, or module.xǁClassǁname__mutmut_N."""
    cls, _, name = function.rpartition(".")
    mangled = f"xǁ{cls}ǁ{name}" if cls else f"x_{name}"
    return f"{module}.{mangled}__mutmut_*"


def mutmut_config():
    """[tool.mutmut] for the scratch copy: mutate the listed modules, copy everything else the tests import."""
    modules = [f"{module}.py" for module in FUNCTIONS]
    others = sorted(path.name for path in REPO.glob("*.py") if path.name not in modules)
    also_copy = [*others, "pytest.ini", "configs"]
    quoted = ", ".join
    return ("[tool.mutmut]\n"
            f"source_paths = [{quoted(repr(m) for m in modules)}]\n"
            f"also_copy = [{quoted(repr(p) for p in also_copy)}]\n"
            f"pytest_add_cli_args_test_selection = [{quoted(repr(t) for t in TESTS)}]\n"
            "pytest_add_cli_args = ['-p', 'no:cacheprovider', '-q']\n"
            "mutate_only_covered_lines = false\n")


def prepare(workdir):
    """A fresh scratch copy of the repository's code and tests with the mutmut configuration, in `workdir`."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    for path in REPO.glob("*.py"):
        shutil.copy2(path, workdir / path.name)
    shutil.copy2(REPO / "pytest.ini", workdir / "pytest.ini")
    for folder in ("configs", "tests"):
        shutil.copytree(REPO / folder, workdir / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (workdir / "pyproject.toml").write_text(mutmut_config(), encoding="utf-8")


def results(workdir):
    """{mutant name: status} from `mutmut results --all true`."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir, check=True,
                         capture_output=True, text=True).stdout
    return dict(re.findall(r"^\s+(\S+__mutmut_\d+): (.+)$", out, flags=re.M))


def score_table(statuses):
    """Markdown rows per function (mutants, killed, survived) and the total score."""
    rows, total = [], Counter()
    for module, functions in FUNCTIONS.items():
        for function in functions:
            prefix = mutant_pattern(module, function)[:-1]
            counts = Counter("killed" if status in KILLED else status
                             for name, status in statuses.items() if name.startswith(prefix))
            n = sum(counts.values())
            total.update(counts)
            rows.append(f"| `{module}.{function}` | {n} | {counts['killed']} | {n - counts['killed']} |")
    n = sum(total.values())
    score = total["killed"] / n if n else 0.0
    return rows, total, score


def main(args):
    workdir = Path(args.workdir).resolve()
    prepare(workdir)
    patterns = [mutant_pattern(module, f) for module, functions in FUNCTIONS.items() for f in functions]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "HW2_TEST_TOY_WORLD": str(workdir / "toy" / "hw2_data")}
    # one toy world for every test session mutmut starts, instead of one per mutant
    subprocess.run([sys.executable, "toy_data.py", "--out", env["HW2_TEST_TOY_WORLD"], "--seed", "0"], cwd=REPO,
                   env=env, check=True)
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs), *patterns]
    run = subprocess.run(command, cwd=workdir, env=env)
    if run.returncode != 0:
        sys.exit(f"mutmut run failed (exit {run.returncode}); see its output above")
    statuses = {name: status for name, status in results(workdir).items()
                if any(re.fullmatch(p.replace("*", r"\d+"), name) for p in patterns)}
    rows, total, score = score_table(statuses)
    survivors = sorted(name for name, status in statuses.items() if status not in KILLED)
    diffs = [subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir, capture_output=True,
                            text=True).stdout for name in survivors]
    report = ["| function | mutants | killed | not killed |", "|---|---:|---:|---:|", *rows, "",
              f"Score: {total['killed']} of {sum(total.values())} mutants killed = {score:.1%}", "",
              "Not killed:", *[f"- {name}: {statuses[name]}" for name in survivors], "", *diffs]
    text = "\n".join(report) + "\n"
    (workdir / "mutation_report.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"report: {workdir / 'mutation_report.md'}")


def build_parser():
    parser = argparse.ArgumentParser(description="Mutation testing of the homework's formulas with mutmut.")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "mutation"),
                        help="scratch folder for the mutated copy and the report (emptied first)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                        help="mutants tested in parallel (one torch thread each)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
