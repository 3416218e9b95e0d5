"""P3's latent diffusion objective (p3_training) in closed form, with stub networks and diffusers' DDPMScheduler."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

import p3_training as training
from utils import Hw2Error


def sd_scheduler(prediction_type):
    """SD v1's training schedule: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def latents(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)


T = torch.tensor([0, 500, 999])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_target_is_the_parameterisations_closed_form(prediction_type):
    """eps; v = sqrt(a) eps - sqrt(1 - a) z_0 (Salimans & Ho 2022, sec. 4); z_0. Fails on swapped branches or a v
    with its terms exchanged or its sign flipped."""
    z_0, eps = latents(0)
    a = sd_scheduler("epsilon").alphas_cumprod[T].reshape(-1, 1, 1, 1)
    expected = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * z_0, "sample": z_0}
    target = training.diffusion_target(sd_scheduler(prediction_type), z_0, eps, T)
    torch.testing.assert_close(target, expected[prediction_type])


def test_an_unknown_parameterisation_is_refused():
    sched = sd_scheduler("epsilon")
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(Hw2Error, match="prediction_type 'flow'"):
        training.diffusion_target(sched, *latents(0), T)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_is_the_mse_between_the_unets_output_and_its_target(prediction_type):
    """The stub UNet checks z_t = sqrt(a) z_0 + sqrt(1 - a) eps (DDPM eq. 4) and that it is conditioned on the text
    encoder's first output, then returns target + delta: the loss is mean(delta^2), per sample with per_sample=True.
    Fails if z_t is formed wrongly, the conditioning is dropped, the target is the wrong one, or the mean is taken
    over the wrong axes."""
    z_0, eps = latents(1)
    sched = sd_scheduler(prediction_type)
    a = sched.alphas_cumprod[T].reshape(-1, 1, 1, 1)
    target = training.diffusion_target(sched, z_0, eps, T)
    delta = torch.tensor([0.0, 0.5, 2.0]).reshape(-1, 1, 1, 1) * torch.linspace(0, 1, 8)
    condition = torch.randn(3, 77, 16)

    def unet(z_t, t, c):
        torch.testing.assert_close(z_t, a.sqrt() * z_0 + (1 - a).sqrt() * eps)
        assert torch.equal(t, T) and torch.equal(c, condition)
        return SimpleNamespace(sample=target + delta)

    unet.dtype = torch.float32
    input_ids = torch.arange(3 * 77).reshape(3, 77)

    def text_encoder(ids):
        assert ids is input_ids, "the text encoder did not get the batch's token ids"
        return condition, "pooled"

    loss = training.denoising_loss(unet, text_encoder, sched, z_0, input_ids, eps, T)
    per_sample = training.denoising_loss(unet, text_encoder, sched, z_0, input_ids, eps, T, per_sample=True)
    expected = (delta**2).expand_as(z_0).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(loss, expected.mean())
