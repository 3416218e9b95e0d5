"""The report's P3 parts: zero-shot accuracy and cases, textual inversion's grader scores and images, and several
concepts in one image by textual inversion beside Custom Diffusion."""

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import custom_diffusion_io
import p3_clip_zeroshot
import p3_concepts
import p3_custom_diffusion
import p3_score
import p3_textual_inversion
import sd_v1
from report_common import code, figure, percent, require, table
from utils import Hw2Error, find_toy_root, get_device, labelled_grid, load_rgb, save_grid, save_pil

WORST_CLASSES = 10
TI_GRID_IMAGES = 4  # images per prompt in the textual-inversion grids


# ---------------------------------------------------------------------------------------------- zero-shot


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


# -------------------------------------------------------------------------------------- textual inversion


def load_images(paths):
    """Image files as one N x 3 x H x W tensor in [-1, 1] (the range utils.save_grid takes)."""
    arrays = [np.asarray(load_rgb(path)) for path in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def ti_embeddings(context, input_json, model):
    """Folder of learned_embeds files: trained into OUT on a toy world with --quick, else --ti-embeds."""
    if context.toy and context.args.quick and not context.args.ti_embeds:
        folder = context.out / "p3_ti" / "quick_embeds"
        context.say(f"P3 textual inversion: training toy embeddings into {folder} (--quick on a toy world).")
        p3_textual_inversion.main(["train", "--input-json", str(input_json), "--model", str(model), "--out",
                                   str(folder), *context.settings.ti_train, *context.seed_flag(),
                                   *context.device_flag()])
        return folder
    folder = Path(context.args.ti_embeds or p3_textual_inversion.DEFAULT_EMBEDS_DIR)
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


def p3_ti_part(context):
    args = context.args
    input_json = require(context.data / "textual_inversion" / "input.json", "input.json", "download the data")
    entries = p3_concepts.read_input_json(input_json, p3_concepts.INPUT_FIELDS)
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
             "One row per prompt, in the table's order.", "", figure(context.out, grid, "generated images"), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------- several concepts: TI vs Custom Diffusion

CAT_FOLDER, CAT_TOKEN, CAT_WORD = "cat", "<cat1>", "cat"  # the provided cat photos, their token and class word
# {0}, {1}: input.json's first two tokens (the dog and the style on the real data); {2}: the cat's token
COMPARE_PROMPTS = ("A {0} next to a {2}.", "A {0} next to a {2} in the style of {1}.", "A {2} sitting on the {0}.")
COMPARE_IMAGES = 4  # images per prompt and method, the same seeds for both methods
# where docs/p3.md trains extra textual-inversion concepts (outside checkpoints/p3_ti, which the grader's run loads)
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
    logit_scale = model.logit_scale.exp().item()
    clip_t, clip_i = None, {}
    for token, photos in references.items():
        per_image_i, per_image_t = p3_score.clip_scores(images, photos, text, logit_scale)
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
              "", "Textual inversion learns each concept's embedding alone against a frozen model, so a prompt that "
              "names several often shows one of them, a blend, or loses the style. Custom Diffusion (Kumari et al., "
              "CVPR 2023) fine-tunes only the key and value projections of the UNet's cross-attention layers, the "
              "weights that read the text, together with one new token per concept; it trains the concepts jointly "
              "(or merges separately tuned key/value weights by a closed-form constrained optimization) and "
              "denoises images of each concept's class word alongside (prior preservation, about 200 images) so "
              "that the class keeps its meaning.", ""]
    return "\n".join(lines)
