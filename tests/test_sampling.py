import pytest
import torch

from ccld import sampling, schedule
from conftest import FIXTURES


@pytest.fixture(scope='module')
def golden():
    return torch.load(FIXTURES / 'sampler_golden.pt', weights_only=False)


def toy_model(x, t, **extra_args):
    """The fixture's v model."""
    return torch.tanh(x) * (0.5 + t[:, None, None, None])


def test_schedules_match_golden(golden):
    t = golden['t_linear']
    torch.testing.assert_close(t, torch.linspace(1, 0, 11)[:-1])
    torch.testing.assert_close(schedule.get_ddpm_schedule(t), golden['ddpm_schedule_of_t_linear'])
    torch.testing.assert_close(schedule.get_spliced_ddpm_cosine_schedule(t),
                               golden['spliced_steps'])
    torch.testing.assert_close(schedule.sampling_timesteps(10), golden['spliced_steps'])


def test_alpha_sigma_round_trip():
    t = torch.linspace(0, 1, 11)
    alpha, sigma = schedule.t_to_alpha_sigma(t)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t))
    torch.testing.assert_close(schedule.alpha_sigma_to_t(alpha, sigma), t)


def test_ddim_matches_golden(golden):
    out = sampling.sample(toy_model, golden['x0'], golden['spliced_steps'], 0.0, {},
                          progress=False)
    torch.testing.assert_close(out, golden['ddim_eta0'], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['prk', 'plms', 'pie', 'plms2', 'iplms'])
def test_multistep_samplers_match_golden(golden, name):
    out = sampling.SAMPLERS[name](toy_model, golden['x0'], golden['spliced_steps'], {},
                                  progress=False)
    torch.testing.assert_close(out, golden[name], rtol=1e-4, atol=1e-5)


def test_ddpm_is_stochastic_and_ddim_is_not(golden):
    steps = golden['spliced_steps']
    run = lambda eta: sampling.sample(toy_model, golden['x0'], steps, eta, {}, progress=False)
    assert torch.equal(run(0.0), run(0.0))
    assert not torch.equal(run(1.0), run(1.0))


def test_callback_sees_every_step(golden):
    seen = []
    sampling.plms_sample(toy_model, golden['x0'], golden['spliced_steps'], {},
                         callback=lambda info: seen.append(info['i']), progress=False)
    assert seen == list(range(10))


def test_reverse_then_forward_ddim_recovers_the_input():
    """With a model that knows x0 exactly, DDIM inversion is exact."""
    x0 = torch.randn(2, 4, 8, 8)

    def oracle(x, t):
        alpha, sigma = schedule.t_to_alpha_sigma(t[:, None, None, None])
        eps = (x - alpha * x0) / sigma.clamp(min=1e-8)
        return alpha * eps - sigma * x0

    steps = torch.linspace(0, 0.9, 11)
    noised = sampling.reverse_sample(oracle, x0, steps, {}, progress=False)
    alpha, sigma = schedule.t_to_alpha_sigma(steps[-1])
    assert noised.std() > x0.std() * alpha  # went towards noise
    back = sampling.sample(oracle, noised, steps.flip(0)[:-1], 0.0, {}, progress=False)
    torch.testing.assert_close(back, x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('eta', [0.5, 1.0])
def test_ddim_noise_has_the_spec_scale(eta):
    """SPEC 2: one step from t to t' gives pred alpha' + eps sqrt(sigma'^2 - s^2) + s noise,
    s = eta sqrt(sigma'^2 / sigma^2) sqrt(1 - alpha^2 / alpha'^2). With v = 0 and x = 1
    everywhere, pred = alpha and eps = sigma, so the next x has mean
    alpha alpha' + sigma sqrt(sigma'^2 - s^2) and standard deviation s; the last step
    returns pred = alpha' x."""
    t = torch.tensor([0.6, 0.2])
    (alpha, alpha_next), (sigma, sigma_next) = (v.double() for v in schedule.t_to_alpha_sigma(t))
    s = eta * (sigma_next ** 2 / sigma ** 2).sqrt() * (1 - alpha ** 2 / alpha_next ** 2).sqrt()
    torch.manual_seed(0)
    out = sampling.sample(lambda x, t: torch.zeros_like(x), torch.ones(50, 4, 32, 32), t, eta,
                          {}, progress=False)
    x_next = out.double() / alpha_next
    mean, std = x_next.mean().item(), x_next.std().item()
    expected_mean = (alpha * alpha_next + sigma * (sigma_next ** 2 - s ** 2).sqrt()).item()
    # 204800 draws: the mean is off by ~s/450, the standard deviation by ~0.2%.
    assert abs(mean - expected_mean) < 0.01 * s.item(), (mean, expected_mean)
    assert abs(std / s.item() - 1) < 0.02, (std, s.item())
