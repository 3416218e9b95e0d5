"""The course grader's CLIP check of P3's generated folders, shared by every P3 method's `score` subcommand.

    python p3_textual_inversion.py score hw2_data/textual_inversion/input.json outputs/p3_ti
    python p3_custom_diffusion.py score hw2_data/textual_inversion/input.json outputs/p3_cd

For each concept and prompt the grader reads the 25 images of OUT_DIR/{concept}/{prompt}/ and scores each with
CLIP (images through its CLIPProcessor): CLIP-I = mean over the concept's reference photos of 100 cos(image,
photo); CLIP-T = the scorer's `logits_per_image` for the eval prompt (its own logit scale times the cosine, which
is 100 cos for openai/clip-vit-base-patch32). It keeps the 5 images with the highest CLIP-I + 2.5 CLIP-T, and
passes the prompt when their mean CLIP-I and mean CLIP-T both reach input.json's baseline.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

from p3_concepts import GRADER_IMAGES, INPUT_FIELDS, list_images, read_input_json
from utils import Hw2Error, announce_toy_world, find_toy_root, get_device, load_rgb

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the grader's CLIP
TOY_CLIP = Path("toy_models") / "tiny-clip-scorer"  # inside a toy hw2_data (see toy_data.build_tiny_sd)
GRADER_TOP_K = 5  # it keeps the 5 images with the highest CLIP-I + 2.5 CLIP-T
GRADER_TEXT_WEIGHT = 2.5


@dataclass(frozen=True)
class PromptScore:
    """One row of the grader's table: the top-k means of one (concept, prompt) folder against its baseline."""
    concept: str
    prompt: int  # index into the concept's prompt list
    clip_i: float
    baseline_i: float
    clip_t: float
    baseline_t: float

    @property
    def passed(self):
        return passes(self.clip_i, self.clip_t, self.baseline_i, self.baseline_t)


def passes(clip_i, clip_t, baseline_i, baseline_t):
    """The grader's rule: a prompt passes when both scores reach their baselines."""
    return clip_i >= baseline_i and clip_t >= baseline_t


def clip_scores(image_features, reference_features, text_features, logit_scale):
    """The grader's per-image scores. CLIP-I = mean over reference photos of 100 cos(image, reference); CLIP-T =
    the scorer's own logits_per_image against the eval prompt, i.e. logit_scale cos(image, text) (100 only for
    OpenAI's CLIP). image_features N x D, reference_features R x D, text_features D; logit_scale a number."""
    image = F.normalize(image_features.float(), dim=-1)
    clip_i = 100 * (image @ F.normalize(reference_features.float(), dim=-1).T).mean(1)  # N
    clip_t = logit_scale * image @ F.normalize(text_features.float(), dim=-1)  # N
    return clip_i, clip_t


def top_k_means(clip_i, clip_t, k=GRADER_TOP_K, text_weight=GRADER_TEXT_WEIGHT):
    """Mean CLIP-I and CLIP-T of the k images with the highest CLIP-I + text_weight * CLIP-T."""
    keep = torch.topk(clip_i + text_weight * clip_t, k).indices
    return clip_i[keep].mean().item(), clip_t[keep].mean().item()


def image_features(model, processor, paths, device, batch_size=32):
    features = []
    for first in range(0, len(paths), batch_size):
        images = [load_rgb(path) for path in paths[first:first + batch_size]]
        pixels = processor(images=images, return_tensors="pt").pixel_values.to(device)
        with torch.no_grad():
            features.append(model.get_image_features(pixel_values=pixels).pooler_output.cpu())
    return torch.cat(features)


def text_features(model, processor, text, device):
    tokens = processor(text=[text], padding=True, truncation=True, return_tensors="pt").to(device)
    with torch.no_grad():
        return model.get_text_features(**tokens).pooler_output[0].cpu()


def load_clip(name):
    try:
        return CLIPModel.from_pretrained(name).eval(), CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise Hw2Error(f"cannot load CLIP {name} ({str(err).strip().splitlines()[0]}); offline, pass --clip "
                       f"with a local folder") from err


def check_folders(data, concepts, out_dir):
    """Every reference folder holds a photo and every prompt folder exactly the grader's image count."""
    for concept, entry in data.items():
        if not list_images(concepts / concept):
            raise Hw2Error(f"reference folder {concepts / concept} holds no image; pass --concepts "
                           f"hw2_data/textual_inversion")
        for p in range(len(entry["prompt"])):
            count = len(list_images(out_dir / concept / str(p)))
            if count != GRADER_IMAGES:
                raise Hw2Error(f"{out_dir / concept / str(p)} holds {count} images; the grader needs exactly "
                               f"{GRADER_IMAGES} (run generate with --num-images {GRADER_IMAGES})")


def score_folders(data, concepts, out_dir, model, processor, device):
    """A PromptScore per (concept, prompt) of input.json `data`, in its order; the folders are checked already."""
    rows = []
    logit_scale = model.logit_scale.exp().item()  # what CLIPModel.forward multiplies the cosines by
    for concept, entry in data.items():
        references = image_features(model, processor, list_images(concepts / concept), device)
        for p, (eval_prompt, (base_i, base_t)) in enumerate(zip(entry["prompt_4_clip_eval"], entry["baseline"])):
            generated = image_features(model, processor, list_images(out_dir / concept / str(p)), device)
            clip_i, clip_t = clip_scores(generated, references, text_features(model, processor, eval_prompt, device),
                                         logit_scale)
            mean_i, mean_t = top_k_means(clip_i, clip_t)
            rows.append(PromptScore(concept, p, mean_i, base_i, mean_t, base_t))
    return rows


def format_table(rows, clip):
    """The per-prompt table and the `passed k/n` line, as printed by `score`."""
    lines = [f"{'concept':>7} {'prompt':>6} {'CLIP-I':>7} {'base':>5} {'CLIP-T':>7} {'base':>5}  result"]
    lines += [f"{row.concept:>7} {row.prompt:>6} {row.clip_i:7.2f} {row.baseline_i:5} {row.clip_t:7.2f} "
              f"{row.baseline_t:5}  {'PASS' if row.passed else 'FAIL'}" for row in rows]
    lines.append(f"passed {sum(row.passed for row in rows)}/{len(rows)} (CLIP {clip}; mean of the top "
                 f"{GRADER_TOP_K} of {GRADER_IMAGES} by CLIP-I + {GRADER_TEXT_WEIGHT} CLIP-T)")
    return "\n".join(lines)


def run_score(args):
    """The `score` subcommand: check the folders, load the scorer, print the table; returns the PromptScore rows."""
    announce_toy_world(args.input_json)
    data = read_input_json(args.input_json, INPUT_FIELDS)
    concepts = Path(args.concepts) if args.concepts else Path(args.input_json).parent
    out_dir = Path(args.out_dir)
    check_folders(data, concepts, out_dir)  # before the (slow) CLIP model is loaded
    toy_root = find_toy_root(args.input_json)
    clip = args.clip or (str(toy_root / TOY_CLIP) if toy_root is not None else DEFAULT_CLIP)
    device = get_device(args.device)
    model, processor = load_clip(clip)
    rows = score_folders(data, concepts, out_dir, model.to(device), processor, device)
    print(format_table(rows, clip))
    return rows


def add_score_command(commands):
    """Add the `score` subcommand (run by `run_score`) to a script's subparsers."""
    score = commands.add_parser("score", help="The grader's CLIP-I / CLIP-T check of generated folders.")
    score.add_argument("input_json", help="The course's input.json (eval prompts and baselines).")
    score.add_argument("out_dir", help="Folder written by generate.")
    score.add_argument("--concepts", default=None,
                       help="Folder of the concepts' reference photos (default: the folder of INPUT_JSON).")
    score.add_argument("--clip", default=None,
                       help=f"transformers CLIP model (default: {DEFAULT_CLIP}, or the tiny toy scorer on a toy "
                            f"world).")
    score.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available).")
    return score
