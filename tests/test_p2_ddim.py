"""DDIM math against diffusers' DDIMScheduler (the course's configuration), post-processing, input checks."""

import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image
from torchvision.utils import save_image

import p2_ddim
from ddim import ddim_sigma, ddim_step
from p2_ddim import (
    DIFFUSERS_DDIM_CONFIG,
    course_timesteps,
    ddim_sample,
    ddim_sample_progressive,
    linear_alpha_bar,
    load_noise,
    mse_255,
    noise_paths,
    predict_x0,
    to_display,
)
from p2_unet import load_face_unet
from utils import Hw2Error, image_generators, to_uint8


def diffusers_scheduler(num_steps):
    scheduler = DDIMScheduler(**DIFFUSERS_DDIM_CONFIG)
    scheduler.set_timesteps(num_steps)
    return scheduler


# --------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("num_steps", [50, 10, 7, 1, 999])
def test_timesteps_are_diffusers_leading_spacing_with_offset_one(num_steps):
    ours = course_timesteps(num_steps)
    assert ours == diffusers_scheduler(num_steps).timesteps.tolist()
    assert all(t - t_next == 1000 // num_steps for t, t_next in zip(ours, ours[1:]))


def test_the_course_sequence_is_981_to_1():
    ours = course_timesteps(50)
    assert ours[0] == 981 and ours[-1] == 1 and len(ours) == 50
    for bad in [0, 1000]:
        with pytest.raises(ValueError, match="between 1 and 999"):
            course_timesteps(bad)


def test_alpha_bar_matches_diffusers():
    scheduler = diffusers_scheduler(50)
    torch.testing.assert_close(linear_alpha_bar().float(), scheduler.alphas_cumprod, rtol=1e-5, atol=0)
    assert float(linear_alpha_bar()[0]) == pytest.approx(float(scheduler.final_alpha_cumprod))


def test_sigma_is_zero_for_ddim_and_the_ddpm_posterior_std_for_eta_one():
    alpha_bar = linear_alpha_bar()
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, variance_type="fixed_small")
    ddim = diffusers_scheduler(50)
    for t in [1, 500, 999]:
        a_t, a_prev = float(alpha_bar[t]), float(alpha_bar[t - 1])
        assert ddim_sigma(a_t, a_prev, 0.0) == 0.0
        # one-step gaps: eta = 1 is DDPM's posterior variance beta_tilde_t (DDIM paper, below eq. (16))
        assert ddim_sigma(a_t, a_prev, 1.0) == pytest.approx(float(ddpm._get_variance(t)) ** 0.5, rel=1e-4)
    for t in [981, 501, 21]:  # the 20-step gaps of the course sequence
        a_t, a_prev = float(alpha_bar[t]), float(alpha_bar[t - 20])
        expected = 0.5 * float(ddim._get_variance(t, t - 20)) ** 0.5
        assert ddim_sigma(a_t, a_prev, 0.5) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("t", [981, 501, 1])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_the_course_step_matches_diffusers_step(t, eta):
    """x0_pred clamped, eps unclamped, then the shared DDIM update: diffusers' step in the course configuration."""
    scheduler = diffusers_scheduler(50)
    generator = torch.Generator().manual_seed(t)
    x_t, eps, z = (torch.randn(2, 3, 8, 8, generator=generator) for _ in range(3))
    eps = eps * 3  # large eps: x0_pred leaves [-1, 1], so the clamp is exercised
    alpha_bar = linear_alpha_bar()
    a_t, a_prev = float(alpha_bar[t]), float(alpha_bar[max(t - 20, 0)])
    x0_pred = predict_x0(x_t, eps, a_t).clamp(-1, 1)
    ours = ddim_step(x0_pred, eps, a_t, a_prev, eta, noise=z)
    theirs = scheduler.step(eps, t, x_t, eta=eta, variance_noise=z)
    torch.testing.assert_close(ours, theirs.prev_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_pred, theirs.pred_original_sample, atol=1e-5, rtol=1e-5)
    assert x0_pred.abs().max() <= 1


def test_eta_above_zero_needs_the_noise():
    with pytest.raises(ValueError, match="noise"):
        ddim_step(torch.zeros(1), torch.zeros(1), 0.5, 0.6, eta=1.0)


# ------------------------------------------------------------------------------ sampler vs diffusers


@pytest.fixture(scope="module")
def toy_unet(toy_world):
    return load_face_unet(toy_world / "face" / "UNet.pt")


@pytest.fixture(scope="module")
def toy_noise(toy_world):
    return load_noise(toy_world / "face" / "noise" / "00.pt")[..., :32, :32]  # 32x32 keeps the test quick


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_trajectory_matches_diffusers_on_the_same_model_and_noise(toy_unet, toy_noise, eta):
    scheduler = diffusers_scheduler(50)
    ours = ddim_sample_progressive(toy_unet, toy_noise, 50, eta, torch.Generator().manual_seed(1))
    their_noise = torch.Generator().manual_seed(1)  # the same per-step draws, handed over as variance_noise
    x_t = toy_noise.clone()
    worst = 0.0
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = toy_unet(x_t, t.float().expand(1))
            z = torch.randn(x_t.shape, generator=their_noise) if eta > 0 else None
            x_t = scheduler.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
            our_t, our_x, _ = next(ours)
            assert our_t == int(t)
            worst = max(worst, float((our_x - x_t).abs().max()))
    assert worst < 1e-4, f"eta = {eta}: largest difference along the trajectory {worst:.2e}"
    assert next(ours, None) is None


def affine_eps(x, t):
    """A stand-in noise predictor: cheap, smooth and timestep-dependent."""
    return 0.5 * x + t[:, None, None, None] / 2000


def test_per_image_generators_make_samples_independent_of_the_batch():
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    together = ddim_sample(affine_eps, x_T, 10, eta=1.0, generator=image_generators(7, 3, "cpu"))
    generators = image_generators(7, 3, "cpu")
    apart = torch.cat([ddim_sample(affine_eps, x_T[i:i + 1], 10, 1.0, generators[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, apart, atol=0, rtol=0)
    other_seed = ddim_sample(affine_eps, x_T, 10, eta=1.0, generator=image_generators(8, 3, "cpu"))
    assert not torch.equal(together, other_seed)


def test_empty_and_odd_batches():
    assert ddim_sample(affine_eps, torch.zeros(0, 3, 8, 8), 5, eta=1.0, generator=[]).shape == (0, 3, 8, 8)
    steps = list(ddim_sample_progressive(affine_eps, torch.randn(1, 3, 8, 8), 3))
    assert [t for t, _, _ in steps] == [667, 334, 1]


# ---------------------------------------------------------------------------------------------- images


def test_minmax_postprocess_is_torchvisions_save_image_normalize(tmp_path):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 + 0.3
    ours = to_uint8(to_display(x, "minmax"))
    for i, image in enumerate(x):
        save_image(image, tmp_path / "ref.png", normalize=True)
        reference = np.asarray(Image.open(tmp_path / "ref.png").convert("RGB"))
        difference = np.abs(ours[i].astype(int) - reference.astype(int))
        # equal up to a rare off-by-one where x sits on a rounding boundary (our [-1, 1] round trip)
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-2, difference.sum()
        assert ours[i].min() == 0 and ours[i].max() == 255
    constant = to_uint8(to_display(torch.full((1, 3, 4, 4), 0.7), "minmax"))
    assert np.all(constant == 0)  # torchvision's 1e-5 guard: no division by zero


def test_clamp_postprocess():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(to_display(x, "clamp"))[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255]
    # to_display itself returns [-1, 1] (to_uint8 would hide a wrong bound by clamping again)
    assert to_display(x, "clamp")[0, 0, 0].tolist() == [-1.0, -1.0, 0.0, 0.5, 1.0]


def test_ddim_sample_defaults_to_deterministic_ddim():
    def model(x, t):
        return torch.tanh(x) + t.reshape(-1, 1, 1, 1) / 1000

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ddim_sample(model, x_T, 3), ddim_sample(model, x_T, 3, eta=0.0))


def test_alpha_bar_is_float64_like_the_courses_helper():
    """float32 betas would round alpha_bar near t = 999 (about 4e-5) at its 3rd significant digit."""
    assert linear_alpha_bar().dtype == torch.float64


def test_minmax_stretches_a_small_range_to_minus_one_one():
    """An image spanning only [0.2, 0.5] still maps to [-1, 1]: the 1e-5 guard only stops a division by zero."""
    x = torch.tensor([0.2, 0.35, 0.5]).reshape(1, 1, 1, 3).expand(1, 3, 1, 3)
    torch.testing.assert_close(to_display(x, "minmax")[0, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(to_display(x), to_display(x, "minmax")), "min-max is the default, as the course's save_image"


def test_mse_is_on_the_255_scale_without_wraparound():
    black, white = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)
    assert mse_255(black, white) == 255.0**2
    assert mse_255(white, black) == 255.0**2
    a, b = np.array([10, 250], np.uint8), np.array([20, 0], np.uint8)
    assert mse_255(a, b) == (10**2 + 250**2) / 2  # fails on a sum where the difference belongs


# ---------------------------------------------------------------------------------------------- inputs


def write_noises(folder, count, shape=(1, 3, 32, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        torch.save(torch.randn(shape), folder / f"{i:02d}.pt")
    return folder


def test_noise_files_are_read_in_numeric_order_and_a_gap_is_named(tmp_path):
    folder = write_noises(tmp_path / "noise", 12)
    (folder / "notes.txt").write_text("ignored")
    assert [p.name for p in noise_paths(folder)] == [f"{i:02d}.pt" for i in range(12)]
    (folder / "04.pt").unlink()
    with pytest.raises(Hw2Error, match=re.escape(str(folder / "04.pt")) + " is missing"):
        noise_paths(folder)


@pytest.mark.parametrize("value, reason", [
    (torch.randn(1, 3, 30, 30), "has shape (1, 3, 30, 30)"),
    (torch.randn(3, 32, 32), "has shape (3, 32, 32)"),
    (torch.randn(2, 3, 32, 32), "has shape (2, 3, 32, 32)"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.int64), "has dtype torch.int64"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    ({"noise": torch.randn(1, 3, 32, 32)}, "holds a dict"),
])
def test_bad_noise_files_are_refused(tmp_path, value, reason):
    torch.save(value, tmp_path / "00.pt")
    with pytest.raises(Hw2Error, match=re.escape(reason)):
        load_noise(tmp_path / "00.pt")


def test_precision_other_than_fp32_is_refused_off_cuda():
    with pytest.raises(Hw2Error, match="--precision fp16"):
        p2_ddim.precision_context(torch.device("cpu"), "fp16")


@pytest.mark.parametrize("matmul, cudnn", [(True, True), (False, True)])
def test_fp32_on_cuda_turns_tf32_off_and_restores_it(monkeypatch, matmul, cudnn):
    """The flags only: this test needs no GPU. cuDNN's default (allow_tf32 = True) would run convolutions in TF32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", matmul)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn)
    with p2_ddim.precision_context(torch.device("cuda"), "fp32"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)
    with p2_ddim.precision_context(torch.device("cpu"), "fp32"):  # off CUDA nothing changes
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)


# -------------------------------------------------------------------------- the script, in process


def run_main(argv, capsys):
    """Run p2_ddim's CLI in this process; return (exit status, stdout, stderr)."""
    try:
        p2_ddim.run_cli(p2_ddim.main, [str(a) for a in argv])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture()
def bad_input_world(toy_world, tmp_path):
    """A writable copy of the toy face folder for breaking things."""
    face = tmp_path / "face"
    shutil.copytree(toy_world / "face", face)
    return face


def break_shape(face):
    torch.save(torch.randn(1, 3, 48, 48), face / "noise" / "03.pt")
    return [], "03.pt has shape (1, 3, 48, 48)"


def break_dtype(face):
    torch.save(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), face / "noise" / "05.pt")
    return [], "05.pt has dtype torch.uint8"


def break_gap(face):
    (face / "noise" / "07.pt").unlink()
    return [], "07.pt is missing"


def break_architecture(face):
    state = torch.load(face / "UNet.pt", weights_only=True)
    state["mid1.attn.qkv.weight"] = state.pop("mid1.attention.qkv.weight")
    torch.save(state, face / "UNet.pt")
    return [], "missing (mid1.attention.qkv.weight)"


def break_gt_size(face):
    Image.new("RGB", (32, 32)).save(face / "GT" / "02.png")
    return ["--gt", face / "GT"], "02.png is 32x32 but the noise is 64x64"


def break_out_dir(face):
    (face / "a_file").write_text("")
    return [], "cannot write to OUT_DIR"


def break_argument_order(face):
    return [], "the arguments are NOISE_DIR OUT_DIR UNET_PT"


@pytest.mark.parametrize("breaker", [break_shape, break_dtype, break_gap, break_architecture, break_gt_size,
                                     break_out_dir, break_argument_order])
def test_bad_input_is_one_line_exit_1_and_no_images(bad_input_world, capsys, breaker):
    face = bad_input_world
    flags, reason = breaker(face)
    out_dir = face / "a_file" / "out" if breaker is break_out_dir else face / "out"
    paths = [face / "noise", out_dir, face / "UNet.pt"]
    if breaker is break_argument_order:  # the UNet where OUT_DIR belongs, the folder last
        paths = [face / "noise", face / "UNet.pt", out_dir]
    status, _, err = run_main([*paths, *flags], capsys)
    assert status == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert reason in err, err
    assert not list(face.rglob("out/*.png"))


def test_gt_prints_the_mean_mse_of_every_clipping_and_postprocessing(toy_world, tmp_path, capsys):
    """With --gt, the mean MSE under each of x0 clipping on/off x minmax/clamp, the one in use marked. Expected
    values: diffusers' DDIMScheduler (clip_sample on or off) on the same UNet and noise, its images written by
    torchvision's save_image (normalize=True for minmax; (x + 1) / 2, clamped, for clamp), against the GT PNGs."""
    face, names = toy_world / "face", ["00", "01"]
    for folder in ("noise", "GT"):
        (tmp_path / folder).mkdir()
    for name in names:
        shutil.copy(face / "noise" / f"{name}.pt", tmp_path / "noise")
        shutil.copy(face / "GT" / f"{name}.png", tmp_path / "GT")
    status, out, err = run_main([tmp_path / "noise", tmp_path / "out", face / "UNet.pt", "--steps", "5", "--gt",
                                 tmp_path / "GT", "--no-clip-x0", "--postprocess", "clamp", "--device", "cpu"], capsys)
    assert status == 0, err
    printed = dict(re.findall(r"^  (--(?:no-)?clip-x0 --postprocess \w+) +([\d.]+(?:  <- in use)?)$", out, re.M))
    assert len(printed) == 4, out
    assert [flags for flags, value in printed.items() if value.endswith("<- in use")] == [
        "--no-clip-x0 --postprocess clamp"]

    unet = load_face_unet(face / "UNet.pt")
    for clip in (True, False):
        scheduler = DDIMScheduler(**{**DIFFUSERS_DDIM_CONFIG, "clip_sample": clip})
        scheduler.set_timesteps(5)
        errors = {"minmax": [], "clamp": []}
        for name in names:
            x_t = torch.load(face / "noise" / f"{name}.pt", weights_only=True).float()
            with torch.no_grad():
                for t in scheduler.timesteps:
                    x_t = scheduler.step(unet(x_t, t.float().expand(1)), t, x_t).prev_sample
            truth = np.asarray(Image.open(face / "GT" / f"{name}.png").convert("RGB")).astype(np.float64)
            for postprocess, kwargs, image in (("minmax", {"normalize": True}, x_t[0]),
                                               ("clamp", {}, (x_t[0] + 1) / 2)):
                save_image(image, tmp_path / "reference.png", **kwargs)
                ours = np.asarray(Image.open(tmp_path / "reference.png").convert("RGB")).astype(np.float64)
                errors[postprocess].append(np.mean((ours - truth) ** 2))
        for postprocess, values in errors.items():
            flags = f"{'--clip-x0' if clip else '--no-clip-x0'} --postprocess {postprocess}"
            value = float(printed[flags].split()[0])
            # off-by-one rounding at rare pixels (see the minmax test above) moves a mean by far less than 0.05
            assert value == pytest.approx(np.mean(values), abs=0.05), (flags, value, np.mean(values))
