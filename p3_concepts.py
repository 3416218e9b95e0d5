"""What every P3 personalization method shares: concepts, new tokens, the grader's layout.

Textual inversion (p3_textual_inversion.py) and Custom Diffusion (p3_custom_diffusion.py) both
- read the course's input.json and each concept's photos (`read_input_json`, `load_concept_images`, `LazyImages`),
- train on random crops of those photos with a prompt template around a new token (`sample_batch`),
- add that token to CLIP's tokenizer and start its embedding at a known word (`add_placeholder_tokens`),
- and write the grader's layout OUT_DIR/{concept}/{prompt}/source{c}_prompt{p}_{i}.png, 25 images per prompt
  folder, each folder's images written in full before they replace the earlier ones, the folder's other files
  (the course's put_your_25_images_here.txt) left as they are (`output_jobs`, `generate_folders`).
What only training needs (precision, the diffusion loss, resume state) is in p3_training.py.
"""

import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from safetensors.torch import save as safetensors_save
from torchvision.transforms import v2
from tqdm import tqdm

from sd_v1 import default_model, load_sd_pipeline
from utils import (
    Hw2Error,
    announce_toy_world,
    atomic_write_bytes,
    atomic_write_text,
    get_device,
    load_rgb,
    save_png,
)

INPUT_FIELDS = ("token_name", "src_image", "prompt", "prompt_4_clip_eval", "baseline")
TOKEN_PATTERN = re.compile(r"<[^<>\s]+>")  # placeholder tokens in prompts: "<new1>"
UNSAFE_FILE_CHARACTERS = re.compile(r'[<>:"/\\|?*\s]')  # refused in file names on some systems
# the course grader's list (load_images_from_folder in its CLIP scoring scripts): a .webp in a prompt folder is not
# counted there, so it is not counted, scored or trained on here
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
GRADER_IMAGES = 25  # the grader refuses any other count per prompt folder
# random square crops covering this fraction of the (pre-resized) photo's area: an object should stay mostly
# in frame; a style is a texture, so smaller crops still show it
CROP_SCALE = {"object": (0.7, 1.0), "style": (0.4, 1.0)}
PRE_RESIZE = 1.25  # photos are first resized to 1.25x the training resolution (short side) so crops stay sharp
SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "dpm": DPMSolverMultistepScheduler}

# The prompt templates of the textual-inversion paper's code (rinongal/textual_inversion, also used by diffusers).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

# ------------------------------------------------------------------------------------------------ input.json


def read_input_json(path, fields):
    """input.json as {concept: entry}; every entry must hold `fields`, with one prompt per eval prompt/baseline."""
    path = Path(path)
    if not path.is_file():
        raise Hw2Error(f"input.json not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise Hw2Error(f"{path} is not valid JSON ({err}); pass the course's input.json") from err
    if not isinstance(data, dict) or not data:
        raise Hw2Error(f"{path} must map concept folders (\"0\", \"1\", ...) to entries; it holds no concept")
    for concept, entry in data.items():
        missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
        if missing:
            raise Hw2Error(f"{path}: concept {concept!r} lacks the field(s) {', '.join(missing)}")
        if not isinstance(entry["token_name"], str) or not TOKEN_PATTERN.fullmatch(entry["token_name"]):
            raise Hw2Error(f"{path}: concept {concept!r} has token_name {entry['token_name']!r}; "
                           f"use a word in angle brackets such as \"<new1>\"")
        if not isinstance(entry["prompt"], list) or not all(isinstance(p, str) for p in entry["prompt"]):
            raise Hw2Error(f"{path}: concept {concept!r} needs \"prompt\" to be a list of strings")
        for field in ("prompt_4_clip_eval", "baseline"):
            if field in fields and (not isinstance(entry[field], list) or len(entry[field]) != len(entry["prompt"])):
                raise Hw2Error(f"{path}: concept {concept!r} needs one {field} entry per prompt "
                               f"({len(entry['prompt'])})")
        if "baseline" in fields and not all(isinstance(b, list) and len(b) == 2 for b in entry["baseline"]):
            raise Hw2Error(f"{path}: concept {concept!r} needs each baseline to be [CLIP-I, CLIP-T]")
    return data


def concept_property(entry):
    """'style' when the concept's prompts use its token as "in the style of <token>", else 'object'."""
    style = re.compile(r"style\s+of\s+" + re.escape(entry["token_name"]), re.IGNORECASE)
    return "style" if any(style.search(prompt) for prompt in entry["prompt"]) else "object"


# ---------------------------------------------------------------------------------------------- concept photos


def list_images(folder):
    """The image files of `folder` (the grader's extensions), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Hw2Error(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def concept_image_paths(folder):
    """`list_images`, refusing a folder without any image."""
    paths = list_images(folder)
    if not paths:
        raise Hw2Error(f"concept folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def load_photo(path, resolution):
    """One photo as a 3 x H x W tensor in [-1, 1], its short side resized to PRE_RESIZE x resolution."""
    resize = v2.Compose([v2.PILToTensor(), v2.Resize(round(resolution * PRE_RESIZE), antialias=True),
                         v2.ToDtype(torch.float32, scale=True)])
    return resize(load_rgb(path)) * 2 - 1


def load_concept_images(folder, resolution):
    """The concept's photos (a handful), each loaded once as `load_photo` gives it."""
    return [load_photo(path, resolution) for path in concept_image_paths(folder)]


class LazyImages:
    """A folder's images as `load_concept_images` gives them, each read from disk only when indexed.

    For Custom Diffusion's class images: 200 per concept, kept in RAM as 640 px fp32 tensors, would take ~1 GB per
    concept; read when drawn, a step costs a few PNG decodes next to a UNet forward and backward."""

    def __init__(self, folder, resolution):
        self.paths = concept_image_paths(folder)
        self.resolution = resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_photo(self.paths[index], self.resolution)


def augment(image, resolution, prop):
    """One training view of a CxHxW photo in [-1, 1]: a random square crop, resized; flipped half the time for
    objects only (a style may not survive mirroring: writing, lighting direction)."""
    crop = v2.RandomResizedCrop(resolution, scale=CROP_SCALE[prop], ratio=(1.0, 1.0), antialias=True)
    image = crop(image)
    if prop == "object" and torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


def sample_batch(images, tokenizer, templates, concept_text, resolution, prop, batch_size):
    """Random views of random photos, each with a random template around the concept's token(s)."""
    picks = torch.randint(len(images), (batch_size,)).tolist()
    words = torch.randint(len(templates), (batch_size,)).tolist()
    pixels = torch.stack([augment(images[i], resolution, prop) for i in picks])  # B x 3 x res x res
    texts = [templates[w].format(concept_text) for w in words]
    input_ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids  # B x 77
    return pixels, input_ids


# ------------------------------------------------------------------------------------------------ new tokens


def placeholder_tokens(token, num_vectors):
    """The tokens that carry a multi-vector concept, named as diffusers does: <t>, <t>_1, ..., <t>_{N-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(text, token, num_vectors):
    """Write `token` in `text` as all its vectors' tokens (what diffusers' pipeline does at generation)."""
    return text.replace(token, " ".join(placeholder_tokens(token, num_vectors)))


def add_placeholder_tokens(tokenizer, text_encoder, token, num_vectors, init_text):
    """Add the concept's tokens, grow the embedding table, and start each new row at the init text's embedding.

    A one-token init text gives that token's row (the paper's choice); a longer one ("David Revoy") gives
    the mean of its tokens' rows. Returns the new rows' ids.
    """
    vocab = tokenizer.get_vocab()
    tokens = placeholder_tokens(token, num_vectors)
    for name in tokens:
        # "dog" is in CLIP's vocabulary as "dog</w>": adding it again would hijack the real word
        if name in vocab or f"{name}</w>" in vocab:
            raise Hw2Error(f"--token {token!r}: {name!r} is already in the tokenizer's vocabulary; "
                           f"pick a new word such as \"<new1>\"")
    init_ids = tokenizer(init_text, add_special_tokens=False).input_ids
    if not init_ids:
        raise Hw2Error(f"--init-token {init_text!r} gives no token; pass a word such as \"dog\"")
    tokenizer.add_tokens(tokens)
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[new_ids] = weight[init_ids].mean(0, keepdim=True)
    return new_ids


def save_learned_embeds(path, token, rows):
    """diffusers' textual-inversion file: {token: [num_vectors, D] float32}, written atomically."""
    atomic_write_bytes(path, safetensors_save({token: rows.detach().float().cpu().contiguous()}))


def token_file_path(folder, token):
    """`folder/<token>.safetensors`, the token without its angle brackets ("<new1>" -> new1.safetensors): Windows
    refuses < and > in file names, and AUTOMATIC1111 and ComfyUI name an embedding after its file."""
    name = UNSAFE_FILE_CHARACTERS.sub("", token) or "embedding"
    return Path(folder) / f"{name}.safetensors"


def save_a1111_embedding(path, rows):
    """The embedding file AUTOMATIC1111 and ComfyUI load: {"emb_params": [num_vectors, D] float32}, atomically."""
    atomic_write_bytes(path, safetensors_save({"emb_params": rows.detach().float().cpu().contiguous()}))


# ------------------------------------------------------------------------------------------------ generation


def image_seed(seed, *index):
    """A per-image seed from (seed, concept, prompt, image): an image does not depend on batch size or order."""
    return int(np.random.SeedSequence([seed, *index]).generate_state(1)[0])


def sample_images(pipe, prompt, seeds, steps, guidance, resolution=None):
    """len(seeds) images of `prompt` (N x 3 x H x W in [0, 1]); image k starts from CPU noise seeded seeds[k]."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    height=resolution, width=resolution, output_type="pt").images.float().cpu()


def check_tokens(pipe, prompts, source, fix="pass the files learned for those tokens"):
    """Every <token> in `prompts` must be in the pipeline's tokenizer (loaded from a learned-embedding file)."""
    missing = sorted({t for p in prompts for t in TOKEN_PATTERN.findall(p)} - set(pipe.tokenizer.get_vocab()))
    if missing:
        raise Hw2Error(f"{source} uses {', '.join(missing)} but no loaded embedding file provides it; {fix}")


def load_embeds(pipe, files):
    """Add every learned token to the pipeline with diffusers' own loader."""
    for path in files:
        try:
            pipe.load_textual_inversion(str(path))
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise Hw2Error(f"cannot load embeddings {path}: {str(err).strip().splitlines()[0]}") from err


def output_jobs(data, out_dir, free_prompts):
    """(folder, file stem, prompt, seed index) for every prompt folder to write."""
    if free_prompts:
        return [(out_dir / "free" / str(k), f"free{k}", prompt, (1, k)) for k, prompt in enumerate(free_prompts)]
    return [(out_dir / concept / str(p), f"source{concept}_prompt{p}", prompt, (0, c, p))
            for c, (concept, entry) in enumerate(data.items()) for p, prompt in enumerate(entry["prompt"])]


def own_images(stem):
    """The names of the images a prompt folder's job writes: {stem}_0.png, {stem}_1.png, ..."""
    return re.compile(re.escape(stem) + r"_\d+\.png")


def check_destination(folder, stem):
    """A prompt folder may hold our own earlier images, which are replaced, and files that are not images, which
    stay untouched (the course's output_folder_example has put_your_25_images_here.txt in each). Any other image is
    refused: the grader would read it as one of ours."""
    if folder.exists() and not folder.is_dir():
        raise Hw2Error(f"{folder} is a file, not a prompt folder: pass another OUT_DIR or move it away")
    if folder.is_dir():
        ours = own_images(stem)
        strays = [p.name for p in sorted(folder.iterdir())
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not ours.fullmatch(p.name)]
        if strays:
            raise Hw2Error(f"{folder} holds images this script did not write ({', '.join(strays[:3])}); the grader "
                           f"reads every image there: pass another OUT_DIR or move them away")


def install_files(source, folder, ours):
    """Move every file of `source` into `folder` (created if missing), each with one atomic rename, then delete the
    images matching `ours` that the new set did not replace. Other files in `folder` stay untouched."""
    folder.mkdir(exist_ok=True)
    new = sorted(p.name for p in source.iterdir())
    for name in new:
        os.replace(source / name, folder / name)
    for path in folder.iterdir():
        if ours.fullmatch(path.name) and path.name not in new:
            path.unlink()


def generate_folders(pipe, jobs, args):
    """Write args.num_images images per job (see `output_jobs`) into its folder; returns the count.

    `args` carries the sampling options added by `add_generation_arguments`."""
    progress = tqdm(total=len(jobs) * args.num_images, desc="generate", unit="img")
    for folder, stem, prompt, index in jobs:
        # All of a prompt's images are written in a temp folder beside `folder` first: a failure on the way leaves
        # the earlier images as they were. Only then do they replace them (see install_files).
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.partial.") as tmp:
            tmp = Path(tmp)
            for first in range(0, args.num_images, args.batch_size):
                batch = range(first, min(first + args.batch_size, args.num_images))
                images = sample_images(pipe, prompt, [image_seed(args.seed, *index, i) for i in batch], args.steps,
                                       args.guidance)
                for i, image in zip(batch, images):
                    save_png(image * 2 - 1, tmp / f"{stem}_{i}.png")
                progress.update(len(batch))
            if args.prompt:  # a free prompt's folder records its prompt; the grader's folders hold images only
                atomic_write_text(tmp / "prompt.txt", prompt + "\n")
            install_files(tmp, folder, own_images(stem))
    progress.close()
    return len(jobs) * args.num_images


def check_generation_args(args):
    if args.num_images < 1 or args.batch_size < 1 or args.steps < 1:
        raise Hw2Error("--num-images, --batch-size and --steps must be at least 1")
    if args.num_images != GRADER_IMAGES and not args.prompt:
        print(f"note: the grader needs exactly {GRADER_IMAGES} images per prompt, not {args.num_images}.")


def set_scheduler(pipe, name):
    """Swap in the sampler `name` (a SCHEDULERS key) built from the model's own scheduler config; 'model' keeps it."""
    if name != "model":
        pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)


def generate_command(args, install, learned, fix="pass the files learned for those tokens"):
    """What every P3 method's `generate` does around its own learned files: check input.json, the flags and the
    output folders, load SD v1 (fp16 on CUDA, which halves its time and memory), `install(pipe)` the learned files
    (described as `learned` in the run header), check that they provide every prompt's tokens, then write the
    grader's folders."""
    announce_toy_world(args.input_json)
    data = read_input_json(args.input_json, ("token_name", "prompt"))
    check_generation_args(args)
    out_dir = Path(args.out_dir)
    jobs = output_jobs(data, out_dir, args.prompt)
    for folder, stem, _, _ in jobs:
        check_destination(folder, stem)
    device = get_device(args.device)
    model = args.model or default_model(args.input_json)
    pipe = load_sd_pipeline(model, torch.float16 if device.type == "cuda" else torch.float32)
    set_scheduler(pipe, args.scheduler)
    install(pipe)
    check_tokens(pipe, [prompt for _, _, prompt, _ in jobs], "--prompt" if args.prompt else args.input_json, fix)
    pipe.to(device)
    print(f"Model {model}; {learned}; {args.scheduler} scheduler, {args.steps} steps.")
    start = time.perf_counter()
    count = generate_folders(pipe, jobs, args)
    seconds = time.perf_counter() - start
    print(f"Wrote {count} images to {out_dir} in {seconds:.1f} s ({count / seconds:.2f} images/s on {device}).")


def add_generation_arguments(parser):
    """The sampling options every P3 `generate` subcommand takes (read by `generate_folders`)."""
    parser.add_argument("--prompt", action="append", default=None,
                        help="A free prompt instead of input.json's (repeatable), e.g. \"A <new1> next to a cat "
                             "in the style of <new2>\"; images go to OUT_DIR/free/{k}/.")
    parser.add_argument("--num-images", type=int, default=GRADER_IMAGES, help="Images per prompt.")
    parser.add_argument("--steps", type=int, default=30, help="Sampling steps.")
    parser.add_argument("--guidance", type=float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--scheduler", choices=["model", *SCHEDULERS], default="dpm",
                        help="Sampler: DPM-Solver++ (dpm), ddim, pndm, or the model's own.")
    parser.add_argument("--batch-size", type=int, default=5, help="Images per pipeline call.")
    parser.add_argument("--seed", type=int, default=0, help="Base seed; each image's seed derives from it.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available).")
