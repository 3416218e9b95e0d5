"""Custom Diffusion on the toy world's tiny Stable Diffusion: diffusers' format and classes, frozen weights, resume."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

import custom_diffusion_io as cdio
import p3_concepts as concepts
import p3_custom_diffusion as cd
import sd_v1
from benchmarks.p3_cd_bench import step_counts
from p3_score import TOY_CLIP
from utils import Hw2Error

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a <new1> next to a <cat1> in the style of <new2>"
# large enough that two steps move the outputs far beyond the 1e-5 equivalence tolerance
TEST_LR = "5e-3"
CUSTOM = "_custom_diffusion"  # to_k_custom_diffusion.weight is the trained copy of to_k.weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ti_dir(toy_world):
    return toy_world / "textual_inversion"


@pytest.fixture(scope="module")
def toy_sd(toy_world):
    return toy_world / sd_v1.TOY_SD


def train_args(out, *extra):
    return ["train", "--steps", "2", "--batch-size", "1", "--save-every", "1", "--lr", TEST_LR, "--device", "cpu",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(ti_dir, tmp_path_factory):
    """Three concepts trained jointly (input.json's object and style, and the cat photos), with generated class
    images; returns (the output folder, the training-time pipeline)."""
    out = tmp_path_factory.mktemp("cd") / "weights"
    pipe = cd.main(train_args(out, "--input-json", str(ti_dir / "input.json"), "--concept", str(ti_dir / "cat"),
                              "<cat1>", "cat", "--num-class-images", "2"))
    return out, pipe


def conditioning(pipe):
    """The text encoder's features of PROMPT (twice), through `pipe`'s own tokenizer and text encoder."""
    input_ids = pipe.tokenizer([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(input_ids)[0]


def unet_output(pipe, c=None):
    """The UNet's prediction at fixed latents and t = 0 and T - 1, conditioned on `c` (default: PROMPT's)."""
    z_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(z_t, torch.tensor([0, 999]), conditioning(pipe) if c is None else c).sample


@pytest.fixture(scope="module")
def base_pipe(toy_sd):
    """A function that returns a fresh copy of the toy base pipeline (loaded once, copied: tests modify theirs)."""
    loaded = sd_v1.load_sd_pipeline(str(toy_sd))
    return lambda: copy.deepcopy(loaded)


# -------------------------------------------------------------------------------------------- diffusers


def test_saved_files_use_diffusers_keys_and_token_format(trained):
    out, pipe = trained
    cross = [name for name in pipe.unet.attn_processors if name.endswith("attn2.processor")]
    weights = load_file(out / cdio.WEIGHTS_FILE)
    expected = {f"{name}.{kind}_custom_diffusion.weight" for name in cross for kind in ("to_k", "to_v")}
    assert set(weights) == expected, sorted(set(weights) ^ expected)
    assert all(value.dtype == torch.float32 for value in weights.values())
    assert sorted(path.name for path in cdio.token_files(out)) == ["cat1.safetensors", "new1.safetensors",
                                                                   "new2.safetensors"]
    assert list(load_file(out / "cat1.safetensors")) == ["<cat1>"]


def test_diffusers_documented_load_attn_procs_leaves_the_base_model(trained, base_pipe):
    """The defect our loader works around; if a diffusers upgrade fixes it, this test says so."""
    out, _ = trained
    pipe = base_pipe()
    before = unet_output(pipe)
    pipe.unet.load_attn_procs(out, weight_name=cdio.WEIGHTS_FILE)
    assert torch.equal(unet_output(pipe), before), "load_attn_procs now installs the processors: drop the workaround"
    with pytest.raises(ValueError, match="number of processors"):
        pipe.unet.load_attn_procs(out, weight_name=cdio.WEIGHTS_FILE, _pipeline=pipe)


def test_diffusers_and_our_loader_reproduce_the_training_model(trained, base_pipe):
    out, trained_pipe = trained
    trained_pipe.unet.eval()
    expected = unet_output(trained_pipe)
    base = unet_output(base_pipe(), conditioning(trained_pipe))  # the same text features, base W_k, W_v

    # diffusers' own path: its parser and processor class, told about the (empty) self-attention entries that
    # safetensors cannot hold, and its textual-inversion loader
    reference = base_pipe()
    state = load_file(out / cdio.WEIGHTS_FILE)
    state.update({name: {} for name in reference.unet.attn_processors if name.endswith("attn1.processor")})
    reference.unet.load_attn_procs(state, _pipeline=reference)
    for path in cdio.token_files(out):
        reference.load_textual_inversion(str(path))
    assert all(isinstance(p, CustomDiffusionAttnProcessor) for p in reference.unet.attn_processors.values())

    ours = base_pipe()
    cdio.load_custom_diffusion(ours, out)
    for name, pipe in (("diffusers", reference), ("our loader", ours)):
        got = unet_output(pipe)
        difference = (got - expected).abs().max().item()
        assert difference <= 1e-5, f"{name}: max |diff| {difference:.2e} from the training-time model"
    change = (expected - base).abs().max().item()
    assert change > 1e-3, f"the trained W_k, W_v moved the output by only {change:.2e} from the base model's"


def test_the_docs_loading_snippet_reproduces_the_training_model(trained, toy_sd):
    """The python block of docs/p3.md that loads our files with diffusers' public classes, run as written."""
    out, trained_pipe = trained
    docs = (REPO / "docs" / "p3.md").read_text()
    section = docs[docs.index("### Loading the files in your own diffusers code"):]
    snippet = section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]
    assert '"checkpoints/p3_cd"' in snippet and '"CompVis/stable-diffusion-v1-4"' in snippet
    snippet = snippet.replace('"checkpoints/p3_cd"', repr(str(out)))
    snippet = snippet.replace('"CompVis/stable-diffusion-v1-4"', repr(str(toy_sd)))
    namespace = {}
    exec(snippet, namespace)
    trained_pipe.unet.eval()
    difference = (unet_output(namespace["pipe"]) - unet_output(trained_pipe)).abs().max().item()
    assert difference <= 1e-5, f"the docs' snippet gives a UNet {difference:.2e} away from the training-time model"


def test_our_loader_reads_diffusers_save_attn_procs_and_takes_effect(base_pipe, tmp_path):
    writer = base_pipe()
    before = unet_output(writer)
    generator = torch.Generator().manual_seed(3)
    processors = {}
    for name, attention in writer.unet.attn_processors.items():  # the layout of diffusers' training example
        layer = writer.unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            processors[name] = CustomDiffusionAttnProcessor(hidden_size=layer.to_k.out_features,
                                                            cross_attention_dim=layer.to_k.in_features,
                                                            train_q_out=False)
            processors[name].load_state_dict({
                "to_k_custom_diffusion.weight": layer.to_k.weight + 0.2 * torch.randn(layer.to_k.weight.shape,
                                                                                      generator=generator),
                "to_v_custom_diffusion.weight": layer.to_v.weight})
        else:
            processors[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
    cross_layers = sum(name.endswith("attn2.processor") for name in processors)
    writer.unet.set_attn_processor(processors)  # (it empties the dict)
    expected = unet_output(writer)
    writer.unet.save_attn_procs(tmp_path)  # diffusers' own writer

    reader = base_pipe()
    path = tmp_path / cdio.WEIGHTS_FILE
    installed = cdio.install_processors(reader.unet, load_file(path), path)
    assert len(installed) == cross_layers
    got = unet_output(reader)
    assert (got - expected).abs().max().item() <= 1e-5
    change = (got - before).abs().max().item()
    assert change > 1e-3, f"loading changed the UNet output by only {change:.2e}"
    self_attention = [p for n, p in reader.unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert not any(isinstance(p, CustomDiffusionAttnProcessor) for p in self_attention), "self-attention replaced"


def test_trainable_processors_start_at_the_base_model(base_pipe):
    pipe = base_pipe()
    before = unet_output(pipe)
    cdio.set_processors(pipe.unet, cdio.trainable_processors(pipe.unet))
    difference = (unet_output(pipe) - before).abs().max().item()
    assert difference <= 1e-6, f"freshly installed processors change the output by {difference:.2e}"


# --------------------------------------------------------------------------------------------- training


def test_only_cross_attention_kv_and_new_rows_change(trained, base_pipe):
    _, pipe = trained
    base = base_pipe()
    base_unet = base.unet.state_dict()
    unet = pipe.unet.state_dict()
    custom = {key for key in unet if cdio.CUSTOM_KEY in key}
    assert set(unet) - custom == set(base_unet)
    changed = [key for key in base_unet if not torch.equal(unet[key], base_unet[key])]
    assert not changed, f"frozen UNet weights changed: {changed[:3]}"
    for key in custom:  # every trained W_k, W_v has moved from the base layer's own weights
        base_key = key.replace(".processor.", ".").replace(CUSTOM, "")
        assert not torch.equal(unet[key], base_unet[base_key]), key
    vocab = base.text_encoder.get_input_embeddings().weight.shape[0]
    for name in ("vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        rows = {key: ours[key][:vocab] for key in ours if key.endswith("token_embedding.weight")}  # old rows only
        changed = [key for key in theirs if not torch.equal(rows.get(key, ours[key]), theirs[key])]
        assert not changed, f"frozen {name} weights changed: {changed[:3]}"
    embedding = pipe.text_encoder.get_input_embeddings().weight.detach()
    cat = base.tokenizer.convert_tokens_to_ids("cat</w>")
    new = pipe.tokenizer.convert_tokens_to_ids("<cat1>")
    assert not torch.equal(embedding[new], embedding[cat])


def test_joint_batch_pairs_each_view_with_a_class_image_of_its_concept(toy_sd):
    tokenizer = CLIPTokenizer.from_pretrained(toy_sd / "tokenizer")  # (a deep copy would decode without spaces)
    tokenizer.add_tokens(["<new1>", "<new2>"])
    pair = [cd.Concept(Path("a"), "<new1>", "rocket", "object"), cd.Concept(Path("b"), "<new2>", "space", "style")]
    photos = [[torch.full((3, 10, 10), -1.0)], [torch.full((3, 10, 10), 1.0)]]
    class_photos = [[torch.full((3, 10, 10), -0.5)], [torch.full((3, 10, 10), 0.5)]]
    torch.manual_seed(0)
    pixels, input_ids, count = cd.joint_batch(pair, photos, class_photos, tokenizer, 8, 6)
    assert count == 6 and pixels.shape == (12, 3, 8, 8) and input_ids.shape == (12, 77)
    texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    for k in range(6):
        concept = 0 if pixels[k].mean() < 0 else 1
        assert pair[concept].token in texts[k], texts[k]
        assert pixels[6 + k].mean().item() == pytest.approx(-0.5 if concept == 0 else 0.5)
        assert texts[6 + k] == pair[concept].class_prompt, texts[6 + k]
    assert {0, 1} == {0 if p.mean() < 0 else 1 for p in pixels[:6]}, "six picks never hit one of the two concepts"


def test_class_images_come_from_the_base_model_and_are_cached(trained, base_pipe):
    out, _ = trained
    folder = out / "class_images" / "cat1"
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "source.json"]
    pipe = base_pipe()
    concepts.set_scheduler(pipe, "dpm")
    cat = cd.Concept(Path("cat"), "<cat1>", "cat", "object")
    image = concepts.sample_images(pipe, cat.class_prompt, [concepts.image_seed(0, cd.CLASS_SEED_INDEX, 1)],
                                   cd.CLASS_IMAGE_STEPS, cd.CLASS_GUIDANCE)[0]
    saved = np.asarray(Image.open(folder / "0001.png"), dtype=np.int16)
    expected = np.asarray(Image.fromarray((image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)),
                          dtype=np.int16)
    assert np.abs(saved - expected).max() <= 1
    with pytest.raises(Hw2Error, match="other settings"):
        cd.generated_class_images(pipe, cat, folder, 3, 32, 0, torch.autocast("cpu", enabled=False), "another")


def test_resume_continues_where_the_last_save_stopped(trained, ti_dir, tmp_path):
    out, _ = trained
    concept = ["--concept", str(ti_dir / "cat"), "<cat1>", "cat", "--class-data-dir", "<cat1>",
               str(out / "class_images" / "cat1"), "--num-class-images", "0"]
    cd.main([*train_args(tmp_path / "straight", *concept), "--steps", "4"])
    cd.main(train_args(tmp_path / "resumed", *concept))
    assert cd.load_checkpoint(tmp_path / "resumed" / cd.STATE_FILE)["step"] == 2
    cd.main([*train_args(tmp_path / "resumed", *concept), "--steps", "4"])
    for name in (cdio.WEIGHTS_FILE, "cat1.safetensors"):
        straight, resumed = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        different = [key for key in straight if not torch.equal(straight[key], resumed[key])]
        assert not different, f"{name}: resumed differs at {different[:2]}"
    with pytest.raises(Hw2Error, match="other settings.*prior_loss_weight"):
        cd.main([*train_args(tmp_path / "resumed", *concept), "--prior-loss-weight", "0.5"])


def test_gradient_checkpointing_and_bf16_keep_the_method(ti_dir, base_pipe, tmp_path):
    concept = ["--concept", str(ti_dir / "0"), "<new1>", "rocket", "--num-class-images", "0", "--steps", "1"]
    runs = {"plain": [], "checkpointed": ["--gradient-checkpointing"], "bf16": ["--mixed-precision", "bf16"]}
    base = base_pipe().unet.state_dict()
    updates = {}
    for name, flags in runs.items():
        cd.main(train_args(tmp_path / name, *concept, *flags))
        weights = load_file(tmp_path / name / cdio.WEIGHTS_FILE)
        assert all(value.dtype == torch.float32 for value in weights.values()), name
        updates[name] = torch.cat([(value - base[key.replace(".processor.", ".").replace(CUSTOM, "")]).flatten()
                                   for key, value in sorted(weights.items())])  # W_k, W_v minus the base ones
    worst = (updates["checkpointed"] - updates["plain"]).abs().max().item()
    assert worst <= 1e-6, f"gradient checkpointing changed the step by {worst:.2e}"
    # Adam's first step is about lr * sign(gradient): bf16 may flip only the signs of near-zero gradients
    cosine = torch.nn.functional.cosine_similarity(updates["bf16"], updates["plain"], dim=0).item()
    assert cosine > 0.9, f"the bf16 step points elsewhere than the fp32 one (cosine {cosine:.3f})"


# -------------------------------------------------------------------------------------- generate, score


def test_generate_fills_the_graders_layout_and_score_reads_it(trained, ti_dir, tmp_path):
    out, _ = trained
    images = tmp_path / "images"
    cd.main(["generate", str(ti_dir / "input.json"), str(images), "--weights", str(out), "--steps", "1",
             "--batch-size", "25", "--device", "cpu"])
    data = json.loads((ti_dir / "input.json").read_text())
    expected = {f"{c}/{p}/source{c}_prompt{p}_{i}.png" for c, entry in data.items()
                for p in range(len(entry["prompt"])) for i in range(concepts.GRADER_IMAGES)}
    assert {path.relative_to(images).as_posix() for path in images.rglob("*") if path.is_file()} == expected
    rows = cd.main(["score", str(ti_dir / "input.json"), str(images), "--device", "cpu"])
    assert [(row.concept, row.prompt) for row in rows] == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]
    for row in rows:  # each row's numbers as the course's grader computes them with the same scorer
        entry = data[row.concept]
        clip_i, clip_t = graders_scores(ti_dir.parent / TOY_CLIP, ti_dir / row.concept,
                                        images / row.concept / str(row.prompt), entry["prompt_4_clip_eval"][row.prompt])
        assert (row.clip_i, row.clip_t) == pytest.approx((clip_i, clip_t), abs=1e-3), row
        assert [row.baseline_i, row.baseline_t] == list(entry["baseline"][row.prompt]), row


def graders_scores(clip_folder, references, generated, prompt):
    """The grader's top-5 mean CLIP-I and CLIP-T of one folder, written from its description with transformers'
    CLIPModel: CLIP-I = mean over the concept's photos of 100 cos(image, photo), CLIP-T = the model's
    logits_per_image against the eval prompt, the 5 images with the highest CLIP-I + 2.5 CLIP-T kept. Catches a
    100 in place of the scorer's logit scale, unnormalised features, or another top-5 rule."""
    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    ours = [Image.open(path).convert("RGB") for path in concepts.list_images(generated)]
    photos = [Image.open(path).convert("RGB") for path in concepts.list_images(references)]
    with torch.no_grad():
        out = model(**processor(text=[prompt], images=ours, return_tensors="pt", padding=True))
        photo_features = model.get_image_features(**processor(images=photos, return_tensors="pt"))
    photo_features = getattr(photo_features, "pooler_output", photo_features)
    image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    photo = photo_features / photo_features.norm(dim=-1, keepdim=True)
    clip_i, clip_t = 100 * (image @ photo.T).mean(1), out.logits_per_image[:, 0]
    keep = sorted(range(len(ours)), key=lambda n: -(clip_i[n] + 2.5 * clip_t[n]).item())[:5]
    return clip_i[keep].mean().item(), clip_t[keep].mean().item()


# -------------------------------------------------------------------------------------------- bad input


def test_bad_training_input_is_one_clear_error(trained, ti_dir, tmp_path):
    out, _ = trained
    cat = ["--concept", str(ti_dir / "cat"), "<cat1>", "cat"]
    cases = [
        ([], "needs --input-json"),
        ([*cat, "--concept", str(ti_dir / "0"), "<cat1>", "rocket"], "more than one concept"),
        (["--concept", str(ti_dir / "cat"), "cat1", "cat"], "angle brackets"),
        ([*cat, "--style", "<new9>"], "--style <new9>: no concept"),
        ([*cat, "--class-data-dir", "<new9>", str(ti_dir / "0")], "--class-data-dir <new9>"),
        ([*cat, "--class-data-dir", "<cat1>", str(tmp_path)], "holds no image"),
        ([*cat, "--num-class-images", "-1"], "--num-class-images must be at least 0"),
        ([*cat, "--concept", str(ti_dir / "0"), "<new1>", "rocket", "--class-data-dir", "<cat1>", str(ti_dir / "cat"),
          "--num-class-images", "0"], "give one for <new1> too"),
        (["--concept", str(ti_dir / "cat"), "<../cat1>", "cat"], "without /"),
        (["--concept", str(ti_dir / "cat"), "<|endoftext|>", "cat", "--num-class-images", "0"], "already in the"),
        (["--concept", str(tmp_path / "nowhere"), "<cat1>", "cat"], "not found"),
    ]
    for extra, message in cases:
        with pytest.raises(Hw2Error, match=message):
            cd.main(train_args(tmp_path / "run", *extra))
    assert not (tmp_path / "run" / cdio.WEIGHTS_FILE).exists()


def test_bad_weights_are_one_clear_error(trained, ti_dir, base_pipe, tmp_path):
    out, _ = trained
    generate = ["generate", str(ti_dir / "input.json"), str(tmp_path / "images"), "--steps", "1", "--device", "cpu"]
    with pytest.raises(Hw2Error, match=f"no {cdio.WEIGHTS_FILE}"):
        cd.main([*generate, "--weights", str(tmp_path)])
    with pytest.raises(Hw2Error, match="<cat9>"):
        cd.main([*generate, "--weights", str(out), "--prompt", "a <cat9>"])
    assert not (tmp_path / "images").exists()

    weights = load_file(out / cdio.WEIGHTS_FILE)
    k_key = next(key for key in weights if "to_k" in key)
    v_key = k_key.replace("to_k", "to_v")
    cases = {"other_model": ({**weights, k_key: torch.zeros(7, 3), v_key: torch.zeros(7, 3)}, "another model"),
             "partial": ({k_key: weights[k_key], v_key: weights[v_key]}, "covers 1 of the UNet's 4"),
             "unknown_layer": ({**weights, k_key.replace("down_blocks.0", "down_blocks.9"): weights[k_key],
                                v_key.replace("down_blocks.0", "down_blocks.9"): weights[v_key]}, "another model"),
             "inconsistent": ({**weights, k_key: torch.zeros(7, 3)}, "not in diffusers' Custom Diffusion format"),
             "not_custom": ({"unet.weight": weights[k_key]}, "no Custom Diffusion weights")}
    unet = base_pipe().unet
    before = dict(unet.attn_processors)
    for name, (broken, message) in cases.items():
        with pytest.raises(Hw2Error, match=message):
            cdio.install_processors(unet, broken, name)
    assert unet.attn_processors == before, "a refused file still changed the UNet's processors"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "cat1.safetensors").write_bytes(b"not safetensors")
    (corrupt / cdio.WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(Hw2Error, match="cannot read"):
        cdio.load_custom_diffusion(base_pipe(), corrupt)


# -------------------------------------------------------------------------------------------- benchmark


def test_benchmark_counts_sd14_trainable_parameters_in_closed_form():
    """SD v1.4: cross-attention in 3 down levels x 2 blocks, the middle block, 3 up levels x 3 blocks; each layer's
    W_k and W_v map the 768-d text features to the level's width."""
    widths = [320, 640, 1280]
    expected = 2 * 768 * (2 * sum(widths) + 1280 + 3 * sum(widths))
    counts = step_counts("CD", 64, 1, 0, torch.float32)
    assert counts["trained_params"] == expected == 19_169_280
    # AdamW holds a gradient and two fp32 moments for W_k, W_v and the whole embedding table (49,408 x 768)
    assert counts["trained_state"] == 3 * 4 * (expected + 49408 * 768)
