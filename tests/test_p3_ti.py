"""Textual inversion on the toy world's tiny Stable Diffusion: the method, the diffusers format, generate, score."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

import p3_concepts as concepts
import p3_score
import p3_textual_inversion as ti
import sd_v1
from utils import Hw2Error, run_cli

REPO = Path(__file__).resolve().parents[1]
# one thread: on a busy 2-core machine, torch's two spinning OpenMP threads make these tiny models ~20x slower
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ti_dir(toy_world):
    return toy_world / "textual_inversion"


@pytest.fixture(scope="module")
def toy_sd(toy_world):
    return toy_world / sd_v1.TOY_SD


def toy_pipeline(toy_sd):
    return sd_v1.load_sd_pipeline(str(toy_sd))


def train_args(*extra):
    return ["train", "--steps", "3", "--batch-size", "1", "--save-every", "1", "--device", "cpu", *extra]


# ------------------------------------------------------------------------------------------------ toy model


def test_toy_tokenizer_gives_open_clip_ids(toy_sd):
    tokenizer = CLIPTokenizer.from_pretrained(toy_sd / "tokenizer")
    reference = open_clip.get_tokenizer("ViT-B-32")
    texts = ["A <new1> standing on a beach at sunset.", "The streets of Paris in the style of David Revoltella!",
             "héllo wörld 123, it's a dog's life", "a " * 100]
    ours = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    theirs = reference(texts)
    for text, a, b in zip(texts, ours, theirs):
        length = int((b != 0).sum())  # open_clip pads with 0, SD with <|endoftext|> (49407)
        assert a[:length].tolist() == b[:length].tolist(), text
        assert (a[length:] == 49407).all(), text


def test_toy_models_stay_small(toy_world):
    folders = (toy_world / sd_v1.TOY_SD, toy_world / p3_score.TOY_CLIP)
    size = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"toy SD + CLIP scorer take {size / 2**20:.1f} MB"


# ------------------------------------------------------------------------------------------------- method


def test_placeholder_tokens_follow_diffusers_naming():
    assert concepts.placeholder_tokens("<new1>", 3) == ["<new1>", "<new1>_1", "<new1>_2"]
    assert concepts.expand_placeholder("a photo of a <new1>", "<new1>", 2) == "a photo of a <new1> <new1>_1"
    assert concepts.concept_property({"token_name": "<new2>", "prompt": ["Paris in the style of <new2>."]}) == "style"
    assert concepts.concept_property({"token_name": "<new1>", "prompt": ["A <new1> on a beach."]}) == "object"


def test_new_rows_start_at_the_init_token(toy_sd):
    pipe = toy_pipeline(toy_sd)
    weight = pipe.text_encoder.get_input_embeddings().weight
    rocket = pipe.tokenizer.convert_tokens_to_ids("rocket</w>")
    ids = concepts.add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, "<new1>", 2, "rocket")
    assert ids == [49408, 49409] and weight.shape[0] == 49410
    assert torch.equal(weight[ids], weight[[rocket, rocket]])
    with pytest.raises(Hw2Error, match="already in the tokenizer"):
        concepts.add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, "dog", 1, "rocket")


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(toy_sd):
    pipe = toy_pipeline(toy_sd)
    new_ids = concepts.add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, "<new1>", 1, "rocket")
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    embedding = pipe.text_encoder.get_input_embeddings()
    embedding.weight.requires_grad_(True)
    original = embedding.weight.detach().clone()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    z_0 = torch.randn(2, 4, 16, 16, generator=generator)
    eps = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([100, 700])
    input_ids = pipe.tokenizer(["a photo of a <new1>"] * 2, padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([embedding.weight], lr=0.05, weight_decay=ti.ADAM_WEIGHT_DECAY)
    losses = []
    for _ in range(6):
        loss = concepts.denoising_loss(pipe.unet, pipe.text_encoder, scheduler, z_0, input_ids, eps, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        concepts.restore_frozen_rows(embedding.weight, original, new_ids)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    frozen = torch.ones(len(original), dtype=torch.bool)
    frozen[new_ids] = False
    assert torch.equal(embedding.weight[frozen], original[frozen])


def test_training_changes_only_new_rows_and_round_trips_through_diffusers(ti_dir, toy_sd, tmp_path):
    out = tmp_path / "two_vectors"
    pipe = ti.main(train_args(str(ti_dir / "0"), "--token", "<new1>", "--init-token", "rocket", "--num-vectors", "2",
                              "--out", str(out)))[0]
    trained = pipe.text_encoder.get_input_embeddings().weight.detach().cpu()
    before = toy_pipeline(toy_sd).text_encoder.get_input_embeddings().weight.detach()
    vocab = before.shape[0]
    assert trained.shape[0] == vocab + 2
    assert torch.equal(trained[:vocab], before), "a row other than the new tokens' changed"
    rocket = before[pipe.tokenizer.convert_tokens_to_ids("rocket</w>")]
    assert not torch.equal(trained[vocab], rocket) and not torch.equal(trained[vocab + 1], rocket)

    saved = load_file(out / ti.EMBEDS_FILE)
    assert list(saved) == ["<new1>"] and torch.equal(saved["<new1>"], trained[vocab:])
    # diffusers' own loader must give the same rows, bit for bit, under the tokens it creates
    fresh = toy_pipeline(toy_sd)
    fresh.load_textual_inversion(str(out / ti.EMBEDS_FILE))
    ids = fresh.tokenizer.convert_tokens_to_ids(["<new1>", "<new1>_1"])
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[ids].detach(), trained[vocab:])


def test_resume_continues_where_the_last_save_stopped(ti_dir, tmp_path):
    concept = ["train", str(ti_dir / "1"), "--token", "<new2>", "--init-token", "deep space", "--property", "style",
               "--batch-size", "1", "--save-every", "1", "--device", "cpu"]
    ti.main([*concept, "--steps", "4", "--out", str(tmp_path / "straight")])
    ti.main([*concept, "--steps", "2", "--out", str(tmp_path / "resumed")])
    assert ti.load_checkpoint(tmp_path / "resumed" / ti.STATE_FILE)["step"] == 2
    ti.main([*concept, "--steps", "4", "--out", str(tmp_path / "resumed")])
    straight = load_file(tmp_path / "straight" / ti.EMBEDS_FILE)["<new2>"]
    resumed = load_file(tmp_path / "resumed" / ti.EMBEDS_FILE)["<new2>"]
    assert torch.equal(straight, resumed), (straight - resumed).abs().max()


# ------------------------------------------------------------------------------------------------ generate


@pytest.fixture(scope="module")
def random_embeds(tmp_path_factory, toy_sd):
    """Two embedding files, <new1> and <new2>, with random rows of the toy text encoder's width."""
    folder = tmp_path_factory.mktemp("embeds")
    generator = torch.Generator().manual_seed(1)
    for concept, token in (("0", "<new1>"), ("1", "<new2>")):
        concepts.save_learned_embeds(folder / concept / ti.EMBEDS_FILE, token, torch.randn(1, 32, generator=generator))
    return folder


def test_generate_writes_the_graders_layout(ti_dir, random_embeds, tmp_path):
    ti.main(["generate", str(ti_dir / "input.json"), str(tmp_path), "--embeds", str(random_embeds), "--steps", "1",
             "--batch-size", "25", "--device", "cpu"])
    data = json.loads((ti_dir / "input.json").read_text())
    expected = {f"{c}/{p}/source{c}_prompt{p}_{i}.png" for c, entry in data.items()
                for p in range(len(entry["prompt"])) for i in range(concepts.GRADER_IMAGES)}
    written = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()}
    assert written == expected
    with Image.open(tmp_path / "0" / "0" / "source0_prompt0_0.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_a_prompt_with_two_learned_tokens_runs_reproducibly(ti_dir, random_embeds, tmp_path):
    prompt = "A <new1> next to a cat in the style of <new2>"
    for name, batch_size in (("first", "2"), ("again", "1")):
        ti.main(["generate", str(ti_dir / "input.json"), str(tmp_path / name), "--embeds", str(random_embeds),
                 "--prompt", prompt, "--num-images", "2", "--steps", "2", "--batch-size", batch_size,
                 "--device", "cpu"])
    folder = tmp_path / "first" / "free" / "0"
    assert sorted(p.name for p in folder.iterdir()) == ["free0_0.png", "free0_1.png", "prompt.txt"]
    assert (folder / "prompt.txt").read_text().strip() == prompt
    for name in ("free0_0.png", "free0_1.png"):  # same seed: same image, whatever the batch size
        first = np.asarray(Image.open(folder / name), dtype=np.int16)
        again = np.asarray(Image.open(tmp_path / "again" / "free" / "0" / name), dtype=np.int16)
        assert np.abs(first - again).max() <= 1, name


# ---------------------------------------------------------------------------------------------------- score


def test_score_formula_matches_the_graders_loops():
    generator = torch.Generator().manual_seed(0)
    images, references, text = torch.randn(25, 8, generator=generator), torch.randn(3, 8, generator=generator), \
        torch.randn(8, generator=generator)
    clip_i, clip_t = p3_score.clip_scores(images, references, text)
    # the grader: for each image, the mean over references of 100 * cosine_similarity, one pair at a time
    for n in range(25):
        by_hand_i = sum(100 * F.cosine_similarity(images[n:n + 1], references[r:r + 1]).item() for r in range(3)) / 3
        by_hand_t = 100 * F.cosine_similarity(images[n:n + 1], text[None]).item()
        assert clip_i[n].item() == pytest.approx(by_hand_i, abs=1e-4)
        assert clip_t[n].item() == pytest.approx(by_hand_t, abs=1e-4)
    # a case where CLIP-I alone would pick other images: the top 5 by I + 2.5 T are images 20..24
    clip_i = torch.tensor([80.0] * 20 + [70.0] * 5)
    clip_t = torch.tensor([20.0] * 20 + [30.0, 31.0, 32.0, 33.0, 34.0])
    assert p3_score.top_k_means(clip_i, clip_t) == pytest.approx((70.0, 32.0))


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_clear_error(ti_dir, toy_world, random_embeds, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"0": {"token_name": "<new1>", "prompt": ["A <new1>."]}}))
    with pytest.raises(Hw2Error, match="lacks the field"):
        ti.main(["score", str(broken), str(tmp_path)])

    out = tmp_path / "no_new2"
    with pytest.raises(Hw2Error, match="<new2>"):
        ti.main(["generate", str(ti_dir / "input.json"), str(out), "--embeds", str(random_embeds / "0"),
                 "--steps", "1", "--device", "cpu"])
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), "files were left behind"

    empty = tmp_path / "empty_concept"
    empty.mkdir()
    with pytest.raises(Hw2Error, match="holds no image"):
        ti.main(train_args(str(empty), "--token", "<x>", "--init-token", "dog", "--out", str(tmp_path / "e")))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "00.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(Hw2Error, match="cannot read image"):
        ti.main(train_args(str(corrupt), "--token", "<x>", "--init-token", "dog", "--out", str(tmp_path / "c"),
                           "--model", str(toy_world / sd_v1.TOY_SD)))

    with pytest.raises(Hw2Error, match="already in the tokenizer"):
        ti.main(train_args(str(ti_dir / "0"), "--token", "dog", "--init-token", "dog", "--out", str(tmp_path / "d")))
    assert not (tmp_path / "d" / ti.EMBEDS_FILE).exists()

    with pytest.raises(Hw2Error, match="does not exist"):
        ti.main(train_args(str(ti_dir / "0"), "--token", "<x>", "--init-token", "dog", "--out", str(tmp_path / "m"),
                           "--model", str(tmp_path / "missing" / "model.ckpt")))


def test_score_refuses_a_folder_without_25_images(ti_dir, random_embeds, tmp_path):
    data = json.loads((ti_dir / "input.json").read_text())
    for concept, entry in data.items():
        for p in range(len(entry["prompt"])):
            folder = tmp_path / concept / str(p)
            folder.mkdir(parents=True)
            for i in range(concepts.GRADER_IMAGES):
                shutil.copy(ti_dir / concept / "00.jpg", folder / f"source{concept}_prompt{p}_{i}.png")
    (tmp_path / "1" / "1" / "source1_prompt1_7.png").unlink()
    with pytest.raises(Hw2Error, match="holds 24 images"):
        ti.main(["score", str(ti_dir / "input.json"), str(tmp_path)])


# ------------------------------------------------------------------------------------------------ smoke run


def run_script(*args):
    return subprocess.run([sys.executable, "p3_textual_inversion.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True)


def test_smoke_train_generate_score(ti_dir, tmp_path):
    embeds, images = tmp_path / "embeds", tmp_path / "images"
    result = run_script("train", "--input-json", str(ti_dir / "input.json"), "--out", str(embeds), "--steps", "2",
                        "--batch-size", "1", "--validate-every", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Toy world" in result.stdout
    assert sorted(p.relative_to(embeds).as_posix() for p in embeds.rglob("*.safetensors")) == [
        "0/learned_embeds.safetensors", "0/train_state.safetensors",
        "1/learned_embeds.safetensors", "1/train_state.safetensors"]
    assert (embeds / "1" / "validation" / "step000000.png").is_file()

    result = run_script("generate", str(ti_dir / "input.json"), str(images), "--embeds", str(embeds), "--steps", "1",
                        "--batch-size", "25", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert len(list(images.rglob("*.png"))) == 4 * concepts.GRADER_IMAGES

    result = run_script("score", str(ti_dir / "input.json"), str(images), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "passed " in result.stdout and "/4" in result.stdout


def test_cli_reports_a_user_error_as_one_line(ti_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ti.main, ["score", str(ti_dir / "input.json"), str(tmp_path / "nothing")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
