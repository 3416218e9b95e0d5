"""Build the toy world: a small `hw2_data` tree in the real archive's layout, offline, from packaged data.

    python toy_data.py --out hw2_data --seed 0        # or: bash hw2_download.sh --toy

Sources are data that ship inside installed packages (scikit-learn's handwritten digits, scikit-image's
sample photos) and tiny randomly initialised models built from configs. The same seed gives the same tree.
A `TOY` marker file at the root tells every script that it runs on a toy world.
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from utils import TOY_MARKER, Hw2Error, run_cli

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


# ---------------------------------------------------------------------------------------------- build

BUILDERS = [build_clip_zeroshot, build_textual_inversion]


def build_toy_world(out, seed=0):
    """Build every part into a temp folder beside `out`, then swap it in: no half-built tree is ever left.

    An existing toy world is replaced; a real `hw2_data` (no TOY marker) is never touched.
    """
    out = Path(out)
    if out.exists() and not (out / TOY_MARKER).is_file():
        raise Hw2Error(f"{out} exists and is not a toy world (no {TOY_MARKER} marker): refusing to overwrite it; "
                       f"move it away or pass another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.toy."))
    try:
        for build in BUILDERS:
            build(tmp, seed)
        (tmp / TOY_MARKER).write_text(json.dumps({"seed": seed, "built_by": "toy_data.py"}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
