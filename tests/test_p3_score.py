"""p3_score: the course grader's CLIP-I / CLIP-T arithmetic, its top-5 rule and its PASS/FAIL rule."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

import p3_score
from p3_concepts import GRADER_IMAGES, list_images
from utils import Hw2Error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clip_scores_match_the_graders_loops():
    generator = torch.Generator().manual_seed(0)
    images, references = torch.randn(25, 8, generator=generator), torch.randn(3, 8, generator=generator)
    text, logit_scale = torch.randn(8, generator=generator), 14.3
    clip_i, clip_t = p3_score.clip_scores(images, references, text, logit_scale)
    # the grader: for each image, the mean over references of 100 * cosine_similarity, one pair at a time
    for n in range(25):
        by_hand_i = sum(100 * F.cosine_similarity(images[n:n + 1], references[r:r + 1]).item() for r in range(3)) / 3
        by_hand_t = logit_scale * F.cosine_similarity(images[n:n + 1], text[None]).item()
        assert clip_i[n].item() == pytest.approx(by_hand_i, abs=1e-4)
        assert clip_t[n].item() == pytest.approx(by_hand_t, abs=1e-4)
    # a case where CLIP-I alone would pick other images: the top 5 by I + 2.5 T are images 20..24
    clip_i = torch.tensor([80.0] * 20 + [70.0] * 5)
    clip_t = torch.tensor([20.0] * 20 + [30.0, 31.0, 32.0, 33.0, 34.0])
    assert p3_score.top_k_means(clip_i, clip_t) == pytest.approx((70.0, 32.0))


def test_clip_t_is_the_scorers_own_logits_per_image(toy_world):
    """On the toy scorer, whose logit scale is not 100, CLIP-T must equal CLIPModel.forward's logits_per_image."""
    folder = toy_world / p3_score.TOY_CLIP
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    logit_scale = model.logit_scale.exp().item()
    assert abs(logit_scale - 100) > 50, logit_scale
    paths = list_images(toy_world / "textual_inversion" / "0") + list_images(toy_world / "textual_inversion" / "1")
    prompt = "A rocket standing on a beach at sunset."
    features = p3_score.image_features(model, processor, paths, "cpu", batch_size=3)
    _, clip_t = p3_score.clip_scores(features, features[:2], p3_score.text_features(model, processor, prompt, "cpu"),
                                     logit_scale)
    with torch.no_grad():
        images = [Image.open(path).convert("RGB") for path in paths]
        graders = model(**processor(text=[prompt], images=images, return_tensors="pt", padding=True))
    assert torch.allclose(clip_t, graders.logits_per_image[:, 0], atol=1e-4), (clip_t, graders.logits_per_image)


def test_a_prompt_passes_only_when_both_scores_reach_their_baselines():
    rows = [p3_score.PromptScore("0", 0, 79.0, 79, 34.0, 34),  # equal to both baselines: PASS
            p3_score.PromptScore("0", 1, 78.99, 79, 40.0, 34),  # CLIP-I short
            p3_score.PromptScore("1", 0, 90.0, 79, 33.99, 34),  # CLIP-T short
            p3_score.PromptScore("1", 1, 50.0, 79, 10.0, 34)]  # both short
    assert [row.passed for row in rows] == [True, False, False, False]
    lines = p3_score.format_table(rows, "clip").splitlines()
    assert [line.split()[-1] for line in lines[1:5]] == ["PASS", "FAIL", "FAIL", "FAIL"]
    assert lines[1].split()[:6] == ["0", "0", "79.00", "79", "34.00", "34"]
    assert lines[-1].startswith("passed 1/4 (CLIP clip;")


def test_score_refuses_a_folder_without_25_images(toy_world, tmp_path):
    ti_dir = toy_world / "textual_inversion"
    data = json.loads((ti_dir / "input.json").read_text())
    for concept, entry in data.items():
        for p in range(len(entry["prompt"])):
            folder = tmp_path / concept / str(p)
            folder.mkdir(parents=True)
            for i in range(GRADER_IMAGES):
                shutil.copy(ti_dir / concept / "00.jpg", folder / f"source{concept}_prompt{p}_{i}.png")
    (tmp_path / "1" / "1" / "source1_prompt1_7.png").unlink()
    with pytest.raises(Hw2Error, match="holds 24 images"):
        p3_score.check_folders(data, ti_dir, tmp_path)
