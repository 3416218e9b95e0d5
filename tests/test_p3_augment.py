"""P3's training views (p3_concepts.augment, sample_batch): crop scale and flips per property, templates per batch.

A horizontal ramp from -1 (left) to 1 (right) shows both at once in each view: the ramp's direction says whether
the view was mirrored, and its span says what fraction of the photo's width the square crop kept.
"""

from types import SimpleNamespace

import pytest
import torch

from p3_concepts import CROP_SCALE, OBJECT_TEMPLATES, STYLE_TEMPLATES, TEMPLATES, augment, sample_batch

SIZE, RESOLUTION, DRAWS = 64, 32, 80


def ramp():
    return torch.linspace(-1, 1, SIZE).expand(3, SIZE, SIZE).clone()


def views(prop):
    torch.manual_seed(0)
    out = torch.stack([augment(ramp(), RESOLUTION, prop) for _ in range(DRAWS)])
    assert out.shape == (DRAWS, 3, RESOLUTION, RESOLUTION)
    slope = out[:, 0, :, -1].mean(1) - out[:, 0, :, 0].mean(1)  # right edge minus left edge
    return slope < 0, slope.abs() / 2  # mirrored, kept fraction of the width


def test_objects_are_flipped_half_the_time_and_styles_never():
    """Fails if styles are mirrored (text, lighting direction), or objects never or always."""
    flipped, _ = views("object")
    assert 0.3 < flipped.float().mean() < 0.7, f"objects flipped {flipped.float().mean():.2f} of the time"
    flipped, _ = views("style")
    assert not flipped.any(), "a style view was mirrored"


@pytest.mark.parametrize("prop", ["object", "style"])
def test_the_crop_keeps_the_propertys_share_of_the_photo(prop):
    """A square crop of area fraction s keeps sqrt(s) of the width: object s in [0.7, 1], style [0.4, 1]. Fails on
    the two scales swapped, or on torchvision's default (0.08, 1)."""
    low, high = CROP_SCALE[prop]
    _, kept = views(prop)
    margin = 2 / SIZE  # the crop's pixel rounding and the antialiased resize
    assert kept.min() >= low**0.5 - margin and kept.max() <= high**0.5 + margin, (kept.min(), kept.max())
    assert kept.min() < (low**0.5 + 1) / 2, f"{prop}: no crop near the smallest allowed, min {kept.min():.2f}"


def test_the_templates_are_the_papers_per_property():
    assert TEMPLATES == {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
    assert all("style of {}" in t for t in STYLE_TEMPLATES) and not any("style" in t for t in OBJECT_TEMPLATES)


def test_sample_batch_draws_photos_and_templates_at_random():
    """Each view comes from one of the photos (constant images with distinct values), each text is one of the
    templates around the concept's text, tokenized to the tokenizer's full length. Fails if the same photo or
    template is always taken, or the concept's text is not put in."""
    photos = [torch.full((3, SIZE, SIZE), value) for value in (-0.5, 0.0, 0.5)]
    seen = []

    def tokenizer(texts, padding, max_length, truncation, return_tensors):
        assert padding == "max_length" and max_length == 77 and truncation and return_tensors == "pt"
        seen.extend(texts)
        return SimpleNamespace(input_ids=torch.zeros(len(texts), max_length, dtype=torch.long))

    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    pixels, input_ids = sample_batch(photos, tokenizer, OBJECT_TEMPLATES, "<cat1>", RESOLUTION, "object", 32)
    assert pixels.shape == (32, 3, RESOLUTION, RESOLUTION) and input_ids.shape == (32, 77)
    values = {round(view.mean().item(), 3) for view in pixels}
    assert values == {-0.5, 0.0, 0.5}, values
    assert len(seen) == 32 and set(seen) <= {t.format("<cat1>") for t in OBJECT_TEMPLATES}
    assert len(set(seen)) > 5, f"only {len(set(seen))} distinct templates in 32 draws"
