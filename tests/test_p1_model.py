"""P1 diffusion math against diffusers' DDPMScheduler / DDIMScheduler (an independent implementation), and the U-Net."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import p1_model as pm
import p1_unet
from ddim import ddim_timesteps
from utils import image_generators

T = 1000
SCHEDULES = ["linear", "cosine"]
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


def our_betas(schedule):
    return pm.make_betas(pm.P1Config(schedule=schedule))


def scheduler(cls, schedule, prediction="eps", clip=True, float64=True, **kwargs):
    """A diffusers scheduler built from its own beta schedule; with float64=True its alpha_bar is replaced by ours
    (after checking they agree in float32) so that the step arithmetic can be compared at float64 precision."""
    sched = cls(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=clip, **kwargs)
    if float64:
        betas = our_betas(schedule)
        sched.betas, sched.alphas = betas, 1 - betas
        sched.alphas_cumprod = pm.alpha_bar_from_betas(betas)
        sched.one = torch.tensor(1.0, dtype=torch.float64)
        if hasattr(sched, "final_alpha_cumprod"):
            sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def toy_denoiser(x, t):
    """A fixed, nonlinear stand-in for the network (depends on x and t), bounded like a real eps/v output."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(1.3 * x + 0.2) * 0.8 + 0.1 * torch.cos(t / 97.0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_diffusers(schedule):
    sched = scheduler(DDPMScheduler, schedule, float64=False)
    betas = our_betas(schedule)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    torch.testing.assert_close(betas.float(), sched.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pm.alpha_bar_from_betas(betas).float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_the_default_config_is_the_course_ddpm_schedule_in_closed_form():
    """P1Config() is DDPM's schedule (Ho et al. 2020, sec. 4): beta_t = 1e-4 + (0.02 - 1e-4) t / (T - 1) in float64,
    alpha_bar_t = exp(sum_{s<=t} log(1 - beta_s))."""
    config = pm.P1Config()
    assert (config.schedule, config.timesteps, config.prediction) == ("linear", T, "eps")
    betas = pm.make_betas(config)
    expected = [1e-4 + (0.02 - 1e-4) * t / (T - 1) for t in range(T)]
    torch.testing.assert_close(betas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    log_alpha_bar = torch.tensor([math.log1p(-b) for b in expected], dtype=torch.float64).cumsum(0)
    torch.testing.assert_close(pm.alpha_bar_from_betas(betas), log_alpha_bar.exp(), rtol=1e-10, atol=0)


def test_cosine_alpha_bar_is_nichol_dhariwal_eq_17():
    """alpha_bar at array index t is f(t + 1) / f(0), f(u) = cos^2(((u / T + s) / (1 + s)) pi / 2), s = 0.008: the
    betas telescope, except the last, which the 0.999 cap (diffusers' squaredcos_cap_v2) replaces."""
    def f(u):
        return math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2

    alpha_bar = pm.alpha_bar_from_betas(pm.cosine_beta_schedule(T))
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar[:-1], expected, rtol=1e-9, atol=1e-15)
    assert float(alpha_bar[-1]) == pytest.approx(float(alpha_bar[-2]) * (1 - 0.999), rel=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_q_sample_and_v_target_match_diffusers(schedule, prediction):
    sched = scheduler(DDPMScheduler, schedule, prediction)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, T - 1])
    alpha_bar = pm.alpha_bar_from_betas(our_betas(schedule))
    torch.testing.assert_close(pm.q_sample(x0, t, alpha_bar, noise), sched.add_noise(x0, noise, t))
    a_t = alpha_bar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(pm.v_target(x0, noise, a_t), sched.get_velocity(x0, noise, t))
    # the network output converts back to the same (x0, eps) pair
    x_t = pm.q_sample(x0, t, alpha_bar, noise)
    target = noise if prediction == "eps" else pm.v_target(x0, noise, a_t)
    x0_back, eps_back = pm.to_x0_eps(target, x_t, a_t, prediction)
    torch.testing.assert_close(eps_back, noise)
    torch.testing.assert_close(x0_back[1:], x0[1:], rtol=1e-6, atol=1e-6)  # t=0 divides by sqrt(alpha_bar) ~ 1


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_and_posterior_match_diffusers(schedule, prediction, clip):
    sched = scheduler(DDPMScheduler, schedule, prediction, clip)
    betas = our_betas(schedule)
    alpha_bar = pm.alpha_bar_from_betas(betas)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for t in [T - 1, 700, 10, 1, 0]:
        output = toy_denoiser(x_t, t)
        seed = 100 + t
        theirs = sched.step(output, t, x_t, generator=torch.Generator().manual_seed(seed)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(seed), dtype=x_t.dtype)
        ours = pm.ddpm_step(output, x_t, t, betas, alpha_bar, noise, prediction, clip)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
        # posterior variance and mean (the step without its noise term)
        x0, _ = pm.to_x0_eps(output, x_t, alpha_bar[t], prediction)
        x0 = x0.clamp(-1, 1) if clip else x0
        mean, variance = pm.q_posterior(x0, x_t, t, betas, alpha_bar)
        their_variance = sched._get_variance(t) if t > 0 else torch.zeros((), dtype=torch.float64)
        torch.testing.assert_close(variance.reshape(-1)[0], their_variance.reshape(()).double(), rtol=1e-10, atol=1e-20)
        their_mean = theirs - (their_variance.sqrt() * noise if t > 0 else 0)
        torch.testing.assert_close(mean, their_mean, rtol=1e-10, atol=1e-10)


def test_posterior_closed_form():
    """Independent check of DDPM eq. 7 in its other form: mean = (x_t - beta_t / sqrt(1 - a_t) eps) / sqrt(alpha_t)
    when x0 is the exact x0 implied by eps."""
    betas = pm.linear_beta_schedule(T)
    alpha_bar = pm.alpha_bar_from_betas(betas)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    t = 321
    x0, _ = pm.to_x0_eps(eps, x_t, alpha_bar[t], "eps")
    mean, _ = pm.q_posterior(x0, x_t, t, betas, alpha_bar)
    expected = (x_t - betas[t] / (1 - alpha_bar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
    torch.testing.assert_close(mean, expected)


@pytest.mark.parametrize("spacing,steps", [("leading", 50), ("trailing", 50), ("trailing", 25), ("trailing", 1000)])
def test_ddim_timesteps_match_diffusers(spacing, steps):
    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    assert ddim_timesteps(T, steps, spacing) == sched.timesteps.tolist()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta,clip,dtype", [(0.0, True, torch.float64), (0.0, False, torch.float32),
                                            (0.7, False, torch.float64), (1.0, True, torch.float64)])
def test_ddim_trajectory_matches_diffusers(schedule, prediction, spacing, eta, clip, dtype):
    """The whole DDIM trajectory against DDIMScheduler: eta > 0 with the same per-step noise handed over, and
    clipping as diffusers' clip_sample with use_clipped_model_output (eps re-derived from the clipped x0)."""
    float64 = dtype == torch.float64
    sched = scheduler(DDIMScheduler, schedule, prediction, clip=clip, float64=float64, set_alpha_to_one=True,
                      timestep_spacing=spacing)
    steps = 50
    sched.set_timesteps(steps)
    alpha_bar = pm.alpha_bar_from_betas(our_betas(schedule))
    x_T = 3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=dtype)  # 3x: clipping acts
    their_noise = torch.Generator().manual_seed(9)
    theirs, x = [x_T], x_T
    for t in sched.timesteps:
        z = torch.randn(x.shape, generator=their_noise, dtype=dtype) if eta > 0 else None
        x = sched.step(toy_denoiser(x, int(t)), t, x, eta=eta, variance_noise=z, use_clipped_model_output=clip)
        theirs.append(x.prev_sample)
        x = x.prev_sample
    ours = list(pm.ddim_sample(lambda x_t, t: toy_denoiser(x_t, t), x_T, alpha_bar, prediction, steps, eta=eta,
                               generator=torch.Generator().manual_seed(9), clip=clip, spacing=spacing))
    assert len(ours) == steps + 1
    assert [t for t, _ in ours] == [int(t) + 1 for t in sched.timesteps] + [0]
    tol = 1e-5 if float64 else 1e-4
    for (_, a), b in zip(ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), rtol=tol, atol=tol)


def test_run_sampler_refuses_bad_eta_and_samplers():
    betas = pm.cosine_beta_schedule(T)
    alpha_bar = pm.alpha_bar_from_betas(betas)
    x_T = torch.zeros(1, 3, 2, 2)
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta must be between 0 and 1"):
            pm.run_sampler(toy_denoiser, x_T, betas, alpha_bar, "v", "ddim", 10, eta)
    with pytest.raises(ValueError, match="sampler must be"):
        pm.run_sampler(toy_denoiser, x_T, betas, alpha_bar, "v", "plms")


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_one_generator_per_image_makes_samples_independent_of_the_batch(sampler, eta):
    betas = pm.cosine_beta_schedule(100)
    alpha_bar = pm.alpha_bar_from_betas(betas)
    x_T = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    def run(x, generators):
        return pm.final(pm.run_sampler(toy_denoiser, x, betas, alpha_bar, "v", sampler, 10, eta, generators))

    together = run(x_T, image_generators(7, 5, "cpu"))
    generators = image_generators(7, 5, "cpu")
    apart = torch.cat([run(x_T[:2], generators[:2]), run(x_T[2:], generators[2:])])
    torch.testing.assert_close(together, apart, rtol=0, atol=0)
    assert not torch.equal(together, run(x_T, image_generators(8, 5, "cpu")))


def test_ddpm_sampler_yields_every_step_and_is_seeded():
    betas = pm.cosine_beta_schedule(T)
    alpha_bar = pm.alpha_bar_from_betas(betas)
    x_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(5))

    def run(seed):
        return list(pm.ddpm_sample(toy_denoiser, x_T, betas, alpha_bar, "v", torch.Generator().manual_seed(seed)))

    first, again, other = run(0), run(0), run(1)
    assert [t for t, _ in first] == list(range(T, -1, -1))
    assert first[0][1] is x_T
    torch.testing.assert_close(first[-1][1], again[-1][1], rtol=0, atol=0)
    assert not torch.equal(first[-1][1], other[-1][1])
    assert first[-1][1].abs().max() <= 1 + 1e-6  # the last step returns the clipped x0 prediction


class RecordingModel(torch.nn.Module):
    """Returns a label-dependent output and records every call's batch size."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, digit, dataset):
        self.calls.append(x.shape[0])
        return x * 0 + (digit * 10 + dataset).to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.5])
def test_guidance_is_one_batched_forward(w):
    model = RecordingModel()
    x = torch.zeros(3, 3, 2, 2)
    digit, dataset = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0])
    out = pm.guided_output(model, x, torch.tensor([5, 5, 5]), digit, dataset, w)
    cond = (digit * 10 + dataset).float().reshape(-1, 1, 1, 1)
    uncond = (pm.NULL_DIGIT * 10 + dataset).float().reshape(-1, 1, 1, 1)  # the reference keeps the dataset
    torch.testing.assert_close(out, ((1 + w) * cond - w * uncond).expand_as(x))
    assert model.calls == ([3] if w == 0 else [6])


def test_guidance_is_combined_in_float32():
    """(1 + w) c - w u with c = 1 + 2^-7, u = 1, w = 5 is 1.046875 exactly; bf16 arithmetic would round 6c first."""
    class HalfModel(torch.nn.Module):
        def forward(self, x, t, digit, dataset):
            values = torch.where(digit == pm.NULL_DIGIT, 1.0, 1 + 2**-7).to(torch.bfloat16)
            return values.reshape(-1, 1, 1, 1).expand(x.shape)

    out = pm.guided_output(HalfModel(), torch.zeros(2, 3, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 2]),
                           torch.tensor([0, 1]), 5.0)
    bf16 = 6 * torch.tensor(1 + 2**-7, dtype=torch.bfloat16) - 5 * torch.tensor(1.0, dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and bool((out == 1.046875).all()), out.flatten()[:2]
    assert float(bf16) != 1.046875  # the cancellation bf16 arithmetic would have made


def test_drop_labels_each_label_independently():
    n = 20000
    digit, dataset = torch.randint(0, 10, (n,)), torch.randint(0, 2, (n,))
    kept = pm.drop_labels(digit, dataset, 0.0)
    assert torch.equal(kept[0], digit) and torch.equal(kept[1], dataset)
    dropped = pm.drop_labels(digit, dataset, 1.0)
    assert (dropped[0] == pm.NULL_DIGIT).all() and (dropped[1] == pm.NULL_DATASET).all()
    d, s = pm.drop_labels(digit, dataset, 0.1, torch.Generator().manual_seed(0))
    both = ((d == pm.NULL_DIGIT) & (s == pm.NULL_DATASET)).float().mean().item()
    assert abs((d == pm.NULL_DIGIT).float().mean().item() - 0.1) < 0.01
    assert abs((s == pm.NULL_DATASET).float().mean().item() - 0.1) < 0.01
    assert abs(both - 0.01) < 0.004  # independent: 0.1 * 0.1
    untouched = d != pm.NULL_DIGIT
    assert torch.equal(d[untouched], digit[untouched])


def test_min_snr_weights():
    alpha_bar = torch.tensor([0.5, 0.9, 1 / 11])  # SNR 1, 9, 0.1
    torch.testing.assert_close(pm.loss_weight(alpha_bar, "eps", 5.0), torch.tensor([1.0, 5 / 9, 1.0]))
    torch.testing.assert_close(pm.loss_weight(alpha_bar, "v", 5.0), torch.tensor([0.5, 0.5, 0.1 / 1.1]))
    torch.testing.assert_close(pm.loss_weight(alpha_bar, "v", 0.0), torch.ones(3))


@pytest.mark.parametrize("name", ["toy", "full"])
def test_unet_shapes_and_conditioning(name):
    torch.manual_seed(0)
    config = pm.preset(name)
    model = pm.Diffusion(config).eval()  # eval: the full preset has dropout
    for p in model.net.parameters():  # the zero-initialised output would hide a missing conditioning path
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 3, 28, 28)
    t = torch.tensor([0, 500, T - 1])
    out = model.net(x, t, torch.tensor([0, 5, pm.NULL_DIGIT]), torch.tensor([0, 1, pm.NULL_DATASET]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    one = model.net(x[:1], t[:1], torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(one, out[:1], rtol=1e-4, atol=1e-5)  # odd batch sizes, batch independence
    other_digit = model.net(x[:1], t[:1], torch.tensor([7]), torch.tensor([0]))
    other_set = model.net(x[:1], t[:1], torch.tensor([0]), torch.tensor([1]))
    other_t = model.net(x[:1], t[:1] + 1, torch.tensor([0]), torch.tensor([0]))
    for changed in (other_digit, other_set, other_t):
        assert not torch.allclose(changed, one)


def test_self_attention_matches_torch_sdpa():
    """The written-out attention against torch's own scaled_dot_product_attention on the same q, k, v."""
    torch.manual_seed(0)
    attention = p1_unet.SelfAttention(channels=64, heads=4, groups=8)
    x = torch.randn(3, 64, 7, 7)
    q, k, v = attention.qkv(attention.norm(x)).reshape(3, 3, 4, 16, 49).unbind(1)
    reference = torch.nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                                                 v.transpose(-1, -2))
    expected = x + attention.proj(reference.transpose(-1, -2).reshape(3, 64, 7, 7))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


TOY_PARAMETERS = 734_380  # the count p1_model.PRESETS and docs/p1.md state for the toy preset


def test_toy_preset_size():
    params = sum(p.numel() for p in pm.Diffusion(pm.preset("toy")).parameters())
    assert params == TOY_PARAMETERS, (f"the toy preset has {params:,} parameters but its documented count is "
                                      f"{TOY_PARAMETERS:,}: re-measure its CPU time and update the docs and this pin")


def test_config_round_trip_and_errors():
    config = pm.preset("toy", schedule="linear", prediction="eps")
    assert pm.P1Config.from_dict(config.to_dict()) == config
    assert pm.P1Config.from_dict({**config.to_dict(), "widths": [32, 64]}) == config  # JSON gives lists
    with pytest.raises(ValueError, match="unknown config fields"):
        pm.P1Config.from_dict({**config.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="schedule"):
        pm.P1Config(schedule="quadratic")
    with pytest.raises(ValueError, match="halved"):
        pm.P1Config(unshuffle=2, widths=(8, 16, 32, 64))


def test_no_float64_tensor_goes_to_a_device_without_float64(monkeypatch):
    """MPS has no float64: moving a float64 tensor there raises. `meta` stands in for such a device, with Tensor.to
    refusing float64 results off the CPU and CUDA as MPS does; the schedule still reaches it, as float32, and holds
    the float64 values rounded once."""
    real_to = torch.Tensor.to

    def to_like_mps(tensor, *args, **kwargs):
        moved = real_to(tensor, *args, **kwargs)
        if moved.dtype == torch.float64 and moved.device.type not in ("cpu", "cuda"):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        return moved

    monkeypatch.setattr(torch.Tensor, "to", to_like_mps)
    diffusion = pm.Diffusion(pm.preset("toy", widths=(8, 16), embed_dim=16, attention_heads=2)).to("meta")
    assert diffusion.net.conv_in.weight.device.type == "meta"
    assert diffusion.alpha_bar.device.type == "meta" and diffusion.alpha_bar.dtype == torch.float32
    assert diffusion.betas.device.type == "meta" and diffusion.betas.dtype == torch.float32
    back = diffusion.to_empty(device="cpu")  # the float64 schedule comes back whole, not from the float32 copy
    assert back.alpha_bar.dtype == torch.float64
    torch.testing.assert_close(back.alpha_bar, pm.alpha_bar_from_betas(pm.make_betas(back.config)), rtol=0, atol=0)


def test_fp16_attention_does_not_overflow():
    """q.k of 64-dim heads with entries near 56 is about 2e5, past fp16's largest value 65504, while q.k / sqrt(d)
    is about 2.5e4. v is made the same at every position, so any attention whose rows sum to 1 returns it: in fp16
    the block must match torch's own fp32 scaled_dot_product_attention on the same q, k, v to fp16's rounding (the
    old q.k-then-scale gave inf, then NaN). test_self_attention_matches_torch_sdpa checks the weights themselves."""
    torch.manual_seed(0)
    channels, heads = 64, 1
    attention = p1_unet.SelfAttention(channels=channels, heads=heads, groups=8)
    with torch.no_grad():
        attention.qkv.weight[:2 * channels].mul_(8)
        attention.qkv.bias[:2 * channels] = 56.0  # q and k: large activations that vary over the positions
        attention.qkv.weight[2 * channels:] = 0.0  # v: one vector at every position
    x = torch.randn(2, channels, 7, 7)
    with torch.no_grad():
        q, k, v = attention.qkv(attention.norm(x)).reshape(2, 3, heads, channels, 49).unbind(1)
        assert float((q.transpose(-1, -2) @ k).abs().max()) > 65504  # the unscaled product overflows fp16
        reference = torch.nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                                                     v.transpose(-1, -2))
        expected = x + attention.proj(reference.transpose(-1, -2).reshape(2, channels, 7, 7))
        out = attention.half()(x.half()).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
