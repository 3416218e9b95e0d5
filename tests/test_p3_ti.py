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
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

import p3_concepts as concepts
import p3_score
import p3_textual_inversion as ti
import p3_training as training
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
    return ["train", "--steps", "3", "--batch-size", "1", "--grad-accum", "1", "--save-every", "1", "--device", "cpu",
            *extra]


# ------------------------------------------------------------------------------------------------ toy model


def test_toy_tokenizer_gives_open_clip_ids(toy_sd):
    tokenizer = CLIPTokenizer.from_pretrained(toy_sd / "tokenizer")
    reference = open_clip.get_tokenizer("ViT-B-32")
    texts = ["A <new1> standing on a beach at sunset.", "The streets of Paris in the style of David Revoy!",
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


def fixed_problem(pipe, batch_size=2):
    """One batch (pixels, input_ids) of the toy concept photo prompt, and the model's DDPM training schedule."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch_size, 3, 32, 32, generator=generator) * 2 - 1
    input_ids = pipe.tokenizer(["a photo of a <new1>"] * batch_size, padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    return (pixels, input_ids), DDPMScheduler.from_config(pipe.scheduler.config)


def ready_to_train(toy_sd, mixed_precision="no", checkpointing=False):
    pipe = toy_pipeline(toy_sd)
    new_ids = concepts.add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, "<new1>", 1, "rocket")
    embedding, autocast, scaler = training.prepare_for_training(pipe, torch.device("cpu"), mixed_precision,
                                                                checkpointing)
    return pipe, new_ids, embedding, autocast, scaler


def test_train_step_lowers_the_loss_on_a_fixed_problem(toy_sd):
    pipe, new_ids, embedding, autocast, scaler = ready_to_train(toy_sd)
    original = embedding.weight.detach().clone()
    batch, scheduler = fixed_problem(pipe)
    optimizer = torch.optim.AdamW([embedding.weight], lr=0.05, weight_decay=ti.ADAM_WEIGHT_DECAY)
    losses = []
    for _ in range(6):
        torch.manual_seed(0)  # the same latent sample, noise and timesteps every step: one fixed problem
        losses.append(ti.train_step(pipe, scheduler, lambda: batch, 1, optimizer, scaler, autocast, original,
                                    new_ids))
    assert losses[-1] < losses[0], losses
    frozen = torch.ones(len(original), dtype=torch.bool)
    frozen[new_ids] = False
    assert torch.equal(embedding.weight[frozen], original[frozen])


def embedding_gradient(pipe, embedding, scheduler, batch, autocast, seed=0):
    """d loss / d embedding table for `batch`, drawing latents, noise and timesteps as train_step does."""
    torch.manual_seed(seed)
    z_0 = training.encode_latents(pipe.vae, batch[0])
    eps = torch.randn_like(z_0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (z_0.shape[0],))
    with autocast:
        loss = training.denoising_loss(pipe.unet, pipe.text_encoder, scheduler, z_0, batch[1], eps, t)
    loss.backward()
    gradient = embedding.weight.grad.clone()
    embedding.weight.grad = None
    return loss.item(), gradient


def test_gradient_checkpointing_recomputes_the_same_gradient(toy_sd):
    plain = ready_to_train(toy_sd)
    checkpointed = ready_to_train(toy_sd, checkpointing=True)
    assert checkpointed[0].unet.is_gradient_checkpointing and not plain[0].unet.is_gradient_checkpointing
    batch, scheduler = fixed_problem(plain[0])
    _, expected = embedding_gradient(plain[0], plain[2], scheduler, batch, plain[3])
    _, recomputed = embedding_gradient(checkpointed[0], checkpointed[2], scheduler, batch, checkpointed[3])
    assert expected.abs().sum() > 0 and torch.allclose(recomputed, expected, rtol=1e-5, atol=1e-9), \
        (recomputed - expected).abs().max()


def test_grad_accum_steps_with_the_mean_of_the_micro_batch_gradients(toy_sd):
    pipe, new_ids, embedding, autocast, scaler = ready_to_train(toy_sd)
    original = embedding.weight.detach().clone()
    batch, scheduler = fixed_problem(pipe, batch_size=1)
    # by hand: the two micro-batches' gradients, drawn in train_step's order from one seeded stream
    torch.manual_seed(7)
    gradients = []
    for _ in range(2):
        z_0 = training.encode_latents(pipe.vae, batch[0])
        eps, t = torch.randn_like(z_0), torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        training.denoising_loss(pipe.unet, pipe.text_encoder, scheduler, z_0, batch[1], eps, t).backward()
        gradients.append(embedding.weight.grad[new_ids].clone())
        embedding.weight.grad = None
    optimizer = torch.optim.SGD([embedding.weight], lr=1.0)  # step = -gradient
    torch.manual_seed(7)
    ti.train_step(pipe, scheduler, lambda: batch, 2, optimizer, scaler, autocast, original, new_ids)
    step = embedding.weight.detach()[new_ids] - original[new_ids]
    expected = -(gradients[0] + gradients[1]) / 2
    assert not torch.allclose(gradients[0], gradients[1]) and torch.allclose(step, expected, atol=1e-7), \
        (step - expected).abs().max()


def test_bf16_autocast_runs_the_frozen_models_in_bf16_close_to_fp32(toy_sd):
    fp32 = ready_to_train(toy_sd)
    bf16 = ready_to_train(toy_sd, mixed_precision="bf16")
    assert bf16[0].unet.dtype == torch.bfloat16 and bf16[0].vae.dtype == torch.bfloat16
    assert bf16[2].weight.dtype == torch.float32  # the trained table stays fp32
    batch, scheduler = fixed_problem(fp32[0])
    loss, gradient = embedding_gradient(fp32[0], fp32[2], scheduler, batch, fp32[3])
    loss_bf16, gradient_bf16 = embedding_gradient(bf16[0], bf16[2], scheduler, batch, bf16[3])
    assert loss_bf16 == pytest.approx(loss, rel=0.05), (loss_bf16, loss)
    cosine = F.cosine_similarity(gradient_bf16.flatten(), gradient.flatten(), dim=0).item()
    assert cosine > 0.9, cosine


def test_the_training_flags_run_end_to_end_and_are_recorded(ti_dir, toy_sd, tmp_path):
    """3 optimizer steps of 2 accumulated micro-batches in bf16: the learned row leaves the initializer's, by at
    most AdamW's bound of about lr per coordinate and step (3 x 2e-3). Fails if accumulation never steps (the row
    stays) or the update is not scaled by the learning rate."""
    out = tmp_path / "flags"
    ti.main(train_args(str(ti_dir / "0"), "--token", "<new1>", "--init-token", "rocket", "--out", str(out),
                       "--grad-accum", "2", "--mixed-precision", "bf16", "--gradient-checkpointing"))
    state = ti.load_checkpoint(out / ti.STATE_FILE)
    assert state["step"] == 3 and (state["config"]["grad_accum"], state["config"]["mixed_precision"]) == (2, "bf16")
    learned = load_file(out / ti.EMBEDS_FILE)["<new1>"]
    _, new_ids, embedding, _, _ = ready_to_train(toy_sd)  # <new1> initialised from "rocket", before any step
    moved = (learned - embedding.weight.detach()[new_ids]).abs()
    assert torch.isfinite(learned).all() and moved.max() > 1e-4, "the learned row did not move"
    assert moved.max() <= 3 * 2e-3 * 1.05, f"the row moved {moved.max():.2e} per coordinate in 3 steps"


def test_a_resume_with_other_settings_is_refused(ti_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--token", "<new1>", "--init-token", "rocket", "--out", str(out)]
    ti.main(train_args(str(ti_dir / "0"), *flags))
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    with pytest.raises(Hw2Error, match=r"from a run with other settings \(lr, seed\)"):
        ti.main(train_args(str(ti_dir / "0"), *flags, "--lr", "0.01", "--seed", "3"))
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_train_loads_the_model_once_and_each_concept_starts_from_the_models_vocabulary(ti_dir, tmp_path,
                                                                                          monkeypatch):
    loads = []
    monkeypatch.setattr(ti, "load_sd_pipeline", lambda *a, **k: loads.append(a) or sd_v1.load_sd_pipeline(*a, **k))
    pipe = ti.main(train_args("--input-json", str(ti_dir / "input.json"), "--out", str(tmp_path / "both")))
    assert len(loads) == 1
    assert len(pipe.tokenizer) == 49409 and "<new1>" not in pipe.tokenizer.get_vocab()  # only the last concept's
    # concept 1 trained after concept 0 in one process equals concept 1 trained on its own
    ti.main(train_args(str(ti_dir / "1"), "--token", "<new2>", "--init-token", "deep space photography",
                       "--property", "style", "--out", str(tmp_path / "alone")))
    together = load_file(tmp_path / "both" / "1" / ti.EMBEDS_FILE)["<new2>"]
    alone = load_file(tmp_path / "alone" / ti.EMBEDS_FILE)["<new2>"]
    assert torch.equal(together, alone), (together - alone).abs().max()


def test_the_validation_prompt_names_each_vector_once(ti_dir, tmp_path, monkeypatch):
    prompts = []
    monkeypatch.setattr(training, "sample_images", lambda pipe, prompt, seeds, *a: prompts.append(prompt) or
                        torch.zeros(len(seeds), 3, 32, 32))
    pipe = ti.main(train_args(str(ti_dir / "0"), "--token", "<new1>", "--init-token", "rocket", "--num-vectors", "2",
                              "--validate-every", "2", "--out", str(tmp_path)))
    assert len(prompts) == 2 and (tmp_path / "validation" / "step000002.png").is_file()
    # what the pipeline feeds its text encoder, by diffusers' own expansion of multi-vector tokens
    assert pipe.maybe_convert_prompt(prompts[0], pipe.tokenizer) == "a photo of a <new1> <new1>_1"


def test_training_changes_only_new_rows_and_round_trips_through_diffusers(ti_dir, toy_sd, tmp_path):
    out = tmp_path / "two_vectors"
    pipe = ti.main(train_args(str(ti_dir / "0"), "--token", "<new1>", "--init-token", "rocket", "--num-vectors", "2",
                              "--out", str(out)))
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
    # the AUTOMATIC1111 / ComfyUI file: {"emb_params": rows}, read by diffusers' loader under the token it is given
    a1111 = load_file(out / "new1.safetensors")
    assert list(a1111) == ["emb_params"] and torch.equal(a1111["emb_params"], trained[vocab:])
    other = toy_pipeline(toy_sd)
    other.load_textual_inversion(str(out / "new1.safetensors"), token="<new1>")
    ids = other.tokenizer.convert_tokens_to_ids(["<new1>", "<new1>_1"])
    assert torch.equal(other.text_encoder.get_input_embeddings().weight[ids].detach(), trained[vocab:])


def test_resume_continues_where_the_last_save_stopped(ti_dir, tmp_path):
    concept = ["train", str(ti_dir / "1"), "--token", "<new2>", "--init-token", "deep space", "--property", "style",
               "--batch-size", "1", "--grad-accum", "1", "--save-every", "1", "--device", "cpu"]
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


def test_the_learned_rows_change_the_image_at_the_same_seed(ti_dir, random_embeds, tmp_path):
    """The same seed with <new1>'s row moved: the images of concept 0 (whose prompts hold <new1>) change, those of
    concept 1 (only <new2>) stay. Fails if the learned rows never reach the text encoder (e.g. the token is added
    but its row left at the initializer's), or if one concept's file leaks into the other's prompts."""
    moved = tmp_path / "moved"
    shutil.copytree(random_embeds, moved)
    rows = load_file(moved / "0" / ti.EMBEDS_FILE)["<new1>"]
    concepts.save_learned_embeds(moved / "0" / ti.EMBEDS_FILE, "<new1>", rows + 3 * torch.ones_like(rows))
    for embeds, out in ((random_embeds, tmp_path / "base"), (moved, tmp_path / "moved_out")):
        ti.main(["generate", str(ti_dir / "input.json"), str(out), "--embeds", str(embeds), "--steps", "2",
                 "--num-images", "1", "--seed", "5", "--device", "cpu"])

    def pixels(root, concept):
        return np.asarray(Image.open(root / concept / "0" / f"source{concept}_prompt0_0.png"), dtype=np.int16)

    # the toy UNet's random cross-attention weighs the text lightly: a few grey levels, but never none at all
    assert not np.array_equal(pixels(tmp_path / "base", "0"), pixels(tmp_path / "moved_out", "0"))
    assert np.array_equal(pixels(tmp_path / "base", "1"), pixels(tmp_path / "moved_out", "1"))


def test_generate_fills_the_courses_output_folder_and_loses_nothing(ti_dir, random_embeds, tmp_path, monkeypatch):
    """The course grades with --output_dir output_folder_example, whose prompt folders each hold
    put_your_25_images_here.txt: it stays untouched (same inode, bytes and time). A rerun replaces our own earlier
    images, surplus ones included; a failure half-way and a folder holding someone else's image change nothing."""
    out = tmp_path / "output_folder_example"
    folders = [out / c / str(p) for c, entry in json.loads((ti_dir / "input.json").read_text()).items()
               for p in range(len(entry["prompt"]))]
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "put_your_25_images_here.txt").write_text("")

    def run(count, seed):
        ti.main(["generate", str(ti_dir / "input.json"), str(out), "--embeds", str(random_embeds), "--steps", "1",
                 "--num-images", str(count), "--batch-size", "1", "--seed", str(seed), "--device", "cpu"])

    def contents():
        return {path.relative_to(tmp_path).as_posix(): (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes())
                for path in tmp_path.rglob("*") if path.is_file()}

    placeholders = {name: value for name, value in contents().items() if name.endswith(".txt")}
    run(3, seed=0)
    first = contents()
    run(2, seed=1)
    second = contents()
    for folder in folders:
        stem = f"source{folder.parent.name}_prompt{folder.name}"
        assert sorted(p.name for p in folder.iterdir()) == sorted([f"{stem}_0.png", f"{stem}_1.png",
                                                                    "put_your_25_images_here.txt"])
        name = (folder / f"{stem}_0.png").relative_to(tmp_path).as_posix()
        assert first[name][2] != second[name][2], f"{name} was not replaced"
    assert {name: value for name, value in second.items() if name.endswith(".txt")} == placeholders

    calls = []

    def failing(*args, **kwargs):  # the second image of the first folder fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    real = concepts.sample_images
    monkeypatch.setattr(concepts, "sample_images", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(2, seed=2)
    monkeypatch.undo()
    assert contents() == second, "a failed run changed the output folders"
    assert not list(out.rglob(".*")), "a failed run left its temp folder"

    (folders[-1] / "mine.jpg").write_bytes(b"someone else's image")
    with pytest.raises(Hw2Error, match="mine.jpg"):
        run(2, seed=3)
    assert {k: v for k, v in contents().items() if not k.endswith("mine.jpg")} == second


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


# ------------------------------------------------------------------------------------------------ smoke run


def run_script(*args):
    return subprocess.run([sys.executable, "p3_textual_inversion.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True)


def graders_numbers(toy_world, images, data):
    """(CLIP-I, CLIP-T, PASS) per (concept, prompt), computed the grader's way through CLIPModel.forward: CLIP-T its
    logits_per_image, CLIP-I 100 x the mean cosine of its normalised image_embeds to the concept's photos."""
    folder = toy_world / p3_score.TOY_CLIP
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    numbers = {}
    for concept, entry in data.items():
        photos = [Image.open(path).convert("RGB") for path in sorted((toy_world / "textual_inversion" /
                                                                     concept).glob("*.jpg"))]
        for p, (prompt, (base_i, base_t)) in enumerate(zip(entry["prompt_4_clip_eval"], entry["baseline"])):
            generated = [Image.open(path).convert("RGB") for path in sorted((images / concept / str(p)).glob("*.png"))]
            with torch.no_grad():
                out = model(**processor(text=[prompt], images=generated, return_tensors="pt", padding=True))
                references = model(**processor(text=[prompt], images=photos, return_tensors="pt")).image_embeds
            clip_t = out.logits_per_image[:, 0]
            clip_i = 100 * (out.image_embeds @ references.T).mean(1)
            top = (clip_i + 2.5 * clip_t).topk(5).indices
            mean_i, mean_t = clip_i[top].mean().item(), clip_t[top].mean().item()
            numbers[(concept, str(p))] = (mean_i, mean_t, "PASS" if mean_i >= base_i and mean_t >= base_t else "FAIL")
    return numbers


@pytest.mark.slow
def test_smoke_train_generate_score(toy_world, ti_dir, tmp_path):
    embeds, images = tmp_path / "embeds", tmp_path / "images"
    result = run_script("train", "--input-json", str(ti_dir / "input.json"), "--out", str(embeds), "--steps", "2",
                        "--batch-size", "1", "--grad-accum", "1", "--validate-every", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Toy world" in result.stdout
    assert sorted(p.relative_to(embeds).as_posix() for p in embeds.rglob("*.safetensors")) == [
        "0/learned_embeds.safetensors", "0/new1.safetensors", "0/train_state.safetensors",
        "1/learned_embeds.safetensors", "1/new2.safetensors", "1/train_state.safetensors"]
    assert (embeds / "1" / "validation" / "step000000.png").is_file()

    # the grader's call, from another working folder with relative paths, with the embeddings just trained
    (tmp_path / "grader").mkdir()
    shutil.copy(ti_dir / "input.json", tmp_path / "grader" / "input.json")
    result = subprocess.run(["bash", str(REPO / "hw2_3.sh"), "input.json", "../images", str(toy_world / sd_v1.TOY_SD),
                             "--steps", "1", "--batch-size", "25", "--device", "cpu"], cwd=tmp_path / "grader",
                            env={**ENV, "HW2_P3_EMBEDS": str(embeds), "PYTHON": sys.executable}, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert f"embeddings {embeds / '0' / ti.EMBEDS_FILE}, {embeds / '1' / ti.EMBEDS_FILE};" in result.stdout
    written = sorted(path.relative_to(images).as_posix() for path in images.rglob("*.png"))
    assert written == sorted(f"{c}/{p}/source{c}_prompt{p}_{i}.png" for c in "01" for p in "01"
                             for i in range(concepts.GRADER_IMAGES))

    result = run_script("score", str(ti_dir / "input.json"), str(images), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = graders_numbers(toy_world, images, json.loads((ti_dir / "input.json").read_text()))
    rows = {tuple(line.split()[:2]): line.split() for line in result.stdout.splitlines()
            if line.split()[-1:] in (["PASS"], ["FAIL"])}
    assert rows.keys() == expected.keys(), result.stdout
    for key, (clip_i, clip_t, verdict) in expected.items():
        printed = rows[key]
        assert (float(printed[2]), float(printed[4]), printed[6]) == (pytest.approx(clip_i, abs=0.006),
                                                                      pytest.approx(clip_t, abs=0.006), verdict), \
            (key, printed, (clip_i, clip_t, verdict))
    passes = sum(verdict == "PASS" for _, _, verdict in expected.values())
    assert f"passed {passes}/4 " in result.stdout


def test_hw2_3_sh_needs_three_arguments(tmp_path):
    result = subprocess.run(["bash", str(REPO / "hw2_3.sh"), "input.json"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("usage: bash hw2_3.sh INPUT_JSON"), result.stderr


def test_cli_reports_a_user_error_as_one_line(ti_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ti.main, ["score", str(ti_dir / "input.json"), str(tmp_path / "nothing")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
