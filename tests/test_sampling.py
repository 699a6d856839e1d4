import math

import pytest
import torch

import closed_form
from ccld.diffusion import sampling, schedule
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


def test_karras_timesteps_follow_eq_5():
    """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) -
    s_max^(1/rho)))^rho, with s_max 80, s_min 0.03, rho 7, where sigma is the
    variance-exploding sigma / alpha = tan(pi t / 2)."""
    n, rho = 10, 7
    sigmas = [(80 ** (1 / rho) + i / (n - 1) * (0.03 ** (1 / rho) - 80 ** (1 / rho))) ** rho
              for i in range(n)]
    t = schedule.sampling_timesteps(n, schedule='karras')
    torch.testing.assert_close(t, torch.tensor([math.atan(s) * 2 / math.pi for s in sigmas]))
    alpha, sigma = schedule.t_to_alpha_sigma(t.double())
    torch.testing.assert_close((sigma / alpha)[[0, -1]], torch.tensor([80, 0.03]).double(),
                               rtol=1e-5, atol=0)


def k_diffusion_dpmpp_2m(model, x, ts):
    """sample_dpmpp_2m as k-diffusion writes it, in float64, for variance-exploding
    sigma_VE = tan(pi t / 2) = sigma / alpha and x_VE = x / alpha; the v model sees
    x = alpha x_VE, and its denoised output is alpha x - sigma v."""
    alpha, sigma = (lambda t: math.cos(math.pi * t / 2)), (lambda t: math.sin(math.pi * t / 2))
    sigmas = [math.tan(math.pi * t / 2) for t in ts] + [0.0]
    t_fn = lambda s: -math.log(s)  # noqa: E731
    x_ve, old_denoised = x.double() / alpha(ts[0]), None
    for i, t in enumerate(ts):
        x = alpha(t) * x_ve
        v = model(x.float(), torch.full([x.shape[0]], t)).double()
        denoised = alpha(t) * x - sigma(t) * v
        if sigmas[i + 1] == 0:
            return denoised
        h = t_fn(sigmas[i + 1]) - t_fn(sigmas[i])
        if old_denoised is None:
            d = denoised
        else:
            r = (t_fn(sigmas[i]) - t_fn(sigmas[i - 1])) / h
            d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
        x_ve = sigmas[i + 1] / sigmas[i] * x_ve - math.expm1(-h) * d
        old_denoised = denoised


def test_dpmpp_2m_is_k_diffusions_update_on_this_schedule(golden):
    """Three steps: a first-order one, a second-order one and the last, which returns the
    x0 prediction; compared with k-diffusion's update in variance-exploding form."""
    ts = [0.9, 0.6, 0.25]
    out = sampling.dpmpp_2m_sample(toy_model, golden['x0'], torch.tensor(ts), {}, progress=False)
    expected = k_diffusion_dpmpp_2m(toy_model, golden['x0'], ts)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_is_exact_for_a_single_point():
    """Data at one point c: the x0 prediction is c everywhere, so the data-prediction
    update is exact at any step count (as DDIM is), on either schedule."""
    c = torch.randn(2, 4, 8, 8)

    def point(x, t):
        alpha, sigma = schedule.t_to_alpha_sigma(t[:, None, None, None])
        return alpha * (x - alpha * c) / sigma - sigma * c

    for name in schedule.SCHEDULES:
        steps = schedule.sampling_timesteps(3, schedule=name)
        out = sampling.dpmpp_2m_sample(point, torch.randn(2, 4, 8, 8), steps, {}, progress=False)
        torch.testing.assert_close(out, c, rtol=1e-4, atol=1e-4)


def test_dpmpp_2m_converges_to_the_exact_gaussian_solution_at_second_order():
    """On Gaussian data the ODE's solution is known. Doubling the steps divides the error
    by nearly 4 (3.2 from 200 to 400 steps, still rising; DDIM's first order gives 2)."""
    model, noise = closed_form.gaussian(), closed_form.noise(4)
    t0 = schedule.sampling_timesteps(1).item()
    start = closed_form.rk4(model, noise, 10, 1.0, t0).float()
    exact = closed_form.gaussian_solution(model, noise)
    errors = []
    for n in (200, 400):
        out = sampling.dpmpp_2m_sample(model, start, schedule.sampling_timesteps(n), {},
                                       progress=False)
        errors.append((out - exact).pow(2).mean().sqrt().item())
    assert errors[1] < 2e-4 and 2.8 < errors[0] / errors[1] < 4.5, errors


def gaussian_runs(*settings, n=16):
    """(RMS error against the exact solution, model calls) of each (method, schedule,
    steps) on the closed-form Gaussian, each started on the exact trajectory at its
    schedule's first timestep (as bench/sampler_error.py does)."""
    model, noise = closed_form.gaussian(), closed_form.noise(n)
    exact = closed_form.gaussian_solution(model, noise)
    results = []
    for method, name, steps in settings:
        calls = []

        def counted(x, t):
            calls.append(t)
            return model(x, t)

        ts = schedule.sampling_timesteps(steps, schedule=name)
        start = closed_form.rk4(model, noise, 10, 1.0, ts[0].item()).float()
        out = sampling.sample_latents(counted, start, ts, method, progress=False)
        results.append(((out - exact).pow(2).mean().sqrt().item(), len(calls)))
    return results


def test_the_preview_setting_is_the_benchmarked_one():
    """bench/sampler_error.py chose sampling.PREVIEW: at most half the model calls of
    the default, PLMS with 50 steps. On a trained network it lands closer to the exact
    solution than PLMS-50; on the closed-form Gaussian it does not (no setting with half
    the calls does: PLMS-50 is within 2e-4 there), so this pins its measured error there,
    with margin. iPLMS, PLMS with a one-call start, is as accurate at 50 calls."""
    preview = tuple(sampling.PREVIEW[k] for k in ('method', 'schedule', 'steps'))
    (plms, plms_calls), (fast, fast_calls), (iplms, iplms_calls) = gaussian_runs(
        ('plms', 'spliced', 50), preview, ('iplms', 'spliced', 50))
    assert plms_calls == 59 and plms < 2e-4, (plms, plms_calls)
    assert 2 * fast_calls <= plms_calls and fast < 7e-3, (fast, fast_calls)
    assert iplms_calls == 50 and iplms <= plms * 1.01, (iplms, plms)
