"""Distillation targets (ccld.diffusion.distillation) against computations written out
here, the student (ccld.models.student), and a short distillation that learns."""

import math

import pytest
import torch

import closed_form
import learning
import tiny
from ccld.diffusion.distillation import (distillation_loss, guidance_target, progressive_target,
                                         student_grid)
from ccld.diffusion.guidance import cfg_model_fn, distilled_cfg_model_fn
from ccld.diffusion.sampling import sample_latents
from ccld.diffusion.schedule import sampling_timesteps
from ccld.models.autoencoder import load_autoencoder
from ccld.models.cloob import load_cloob
from ccld.models.student import student_of
from ccld.train import distill_module


def cos_sin(t):
    """alpha, sigma of SPEC 2, shaped [n, 1, 1, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64)[:, None, None, None]
    return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)


def ddim_by_hand(v_model, x, t, s):
    """One DDIM step of SPEC 2 from t to s: pred = alpha x - sigma v, eps = sigma x + alpha v,
    next x = pred alpha' + eps sigma'."""
    (a, sg), (a2, sg2) = cos_sin(t), cos_sin(s)
    v = v_model(x, t)
    return (a * x - sg * v) * a2 + (sg * x + a * v) * sg2


@pytest.fixture(scope='module')
def teacher():
    return tiny.tiny_diffusion(seed=0).requires_grad_(False)


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn([4, 4, 8, 8], generator=g)
    cond = torch.randn([4, 512], generator=g)
    cond[3] = 0  # a dropped condition
    return x, torch.tensor([0.1, 0.4, 0.7, 0.95]), cond, torch.tensor([1.0, 2.5, 8.0, 4.0])


def test_the_guidance_target_is_uncond_plus_w_times_cond_minus_uncond(teacher, batch):
    x, t, cond, w = batch
    with torch.no_grad():
        uncond = teacher(x, t, torch.zeros_like(cond))  # two calls, one for each half
        conditional = teacher(x, t, cond)
        target = guidance_target(teacher, x, t, cond, w)
    expected = uncond + w[:, None, None, None] * (conditional - uncond)
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(target[3], uncond[3], rtol=1e-4, atol=1e-5)  # dropped: uncond


def test_a_fresh_student_gives_its_teachers_conditional_v_whatever_w(teacher, batch):
    x, t, cond, _ = batch
    student = student_of(teacher)
    ours, theirs = student.state_dict(), teacher.state_dict()
    assert set(theirs) <= set(ours)
    assert {key.split('.')[0] for key in set(ours) - set(theirs)} == {'guidance_embed'}
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    with torch.no_grad():
        expected = teacher(x, t, cond)
        for w in (1.0, 3.0, 8.0, torch.tensor([1.0, 2.0, 5.0, 8.0])):
            assert torch.equal(student(x, t, cond, w), expected)
        assert torch.equal(student(x, t, cond), expected)  # no w: the conditional v


def test_the_progressive_target_takes_the_teachers_two_ddim_steps_in_one():
    """On Gaussian data (closed-form v, and an ODE whose solution is known): one DDIM step
    with the target lands where two of the teacher's, computed by hand, land; and so
    closer to the exact solution than the teacher's own single step over the interval."""
    model = closed_form.gaussian()
    mean, std = model.means[0], model.stds[0]
    x = closed_form.noise(4, seed=5).double()
    t, t_mid, s = (torch.full([4], v, dtype=torch.float64) for v in (0.9, 0.7, 0.45))
    target = progressive_target(model, x, t, t_mid, s)
    two_steps = ddim_by_hand(model, ddim_by_hand(model, x, t, t_mid), t_mid, s)
    one_step = ddim_by_hand(lambda x, t: target, x, t, s)
    torch.testing.assert_close(one_step, two_steps, rtol=0, atol=1e-10)
    # Exact: z = (x_t - alpha mu) / sqrt(alpha^2 std^2 + sigma^2) is constant along the ODE.
    (a, sg), (a2, sg2) = cos_sin(t), cos_sin(s)
    exact = a2 * mean + (a2 ** 2 * std ** 2 + sg2 ** 2).sqrt() * \
        (x - a * mean) / (a ** 2 * std ** 2 + sg ** 2).sqrt()
    teacher_error = (ddim_by_hand(model, x, t, s) - exact).pow(2).mean().sqrt()
    target_error = (one_step - exact).pow(2).mean().sqrt()
    # DDIM is first order: two half steps land about half as far (here 0.040 vs 0.075).
    assert target_error < 0.6 * teacher_error, (target_error, teacher_error)


def test_without_w_a_student_is_guided_at_1_whatever_its_guidance_embedding(teacher, batch):
    """student(x, t, c) is documented as w = 1; a trained guidance embedding (here random)
    makes w matter, so the default shows."""
    x, t, cond, _ = batch
    student = student_of(teacher)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in student.guidance_embed.mlp[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        at_1, at_3 = student(x, t, cond, 1.0), student(x, t, cond, 3.0)
        assert (at_1 - at_3).abs().max() > 1e-3
        assert torch.equal(student(x, t, cond), at_1)


def test_a_round_learns_the_teachers_two_steps_taken_at_the_drawn_w():
    """distillation_loss of a progressive round (2 student steps) with a teacher student
    that records its w: each call gets the batch's w, and the loss of a student that
    predicts v = 0 is the mean square of the two-step target computed by hand at that w."""
    g = torch.Generator().manual_seed(6)
    x0, noise = (torch.randn([4, 4, 8, 8], generator=g, dtype=torch.float64) for _ in 'ab')
    cond = torch.randn([4, 512], generator=g, dtype=torch.float64)
    w = torch.tensor([1.5, 3.0, 6.0, 8.0], dtype=torch.float64)
    u = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)  # steps 0, 0, 1, 1
    calls = []

    def v(x, t, c, w):
        w = torch.as_tensor(w, dtype=x.dtype).expand(t.shape)[:, None, None, None]
        return torch.tanh(x) * (0.5 + t[:, None, None, None]) + 0.1 * w * c[:, :4, None, None]

    def teacher(x, t, c, w=1.0):  # a student's signature: w = 1 unless given
        calls.append(torch.as_tensor(w, dtype=x.dtype).expand(t.shape).clone())
        return v(x, t, c, w)

    loss = distillation_loss(lambda x, t, c, w: torch.zeros_like(x), teacher, x0, cond, w, u,
                             noise, student_steps=2)
    grid = torch.cat([sampling_timesteps(4).double(), torch.zeros(1, dtype=torch.float64)])
    step = torch.tensor([0, 0, 1, 1])
    t, t_mid, s = grid[2 * step], grid[2 * step + 1], grid[2 * step + 2]
    a, sg = cos_sin(t)
    x = a * x0 + sg * noise
    teacher_v = lambda x, t: v(x, t, cond, w)  # noqa: E731
    x_s = ddim_by_hand(teacher_v, ddim_by_hand(teacher_v, x, t, t_mid), t_mid, s)
    # One DDIM step is affine in v: x_s = P + Q v.
    p = ddim_by_hand(lambda x, t: torch.zeros_like(x), x, t, s)
    q = ddim_by_hand(lambda x, t: torch.ones_like(x), x, t, s) - p
    target = (x_s - p) / q
    # (the grid and its alpha, sigma are float32 in the code: agreement to 1e-6)
    torch.testing.assert_close(loss, target.pow(2).flatten(1).mean(1).mean(), rtol=1e-6, atol=0)
    assert len(calls) == 2 and all(torch.equal(c, w) for c in calls)


@pytest.fixture(scope='module')
def distillation(teacher, tmp_path_factory):
    """A round's LightningDistillation (2 student steps, w in [2, 6]) on tiny frozen models."""
    d = tmp_path_factory.mktemp('distillation')
    module = distill_module.LightningDistillation(
        load_autoencoder(tiny.tiny_autoencoder(d)), load_cloob(str(tiny.tiny_cloob(d))),
        teacher, student_of(teacher), 2, guidance_range=(2.0, 6.0))
    module.setup('fit')
    return module


def test_the_guidance_scales_drawn_in_training_fill_the_guidance_range(distillation,
                                                                       monkeypatch):
    drawn = []

    def loss(student, teacher, x0, cond, w, *args):
        drawn.append(w)
        return x0.sum() * 0
    monkeypatch.setattr(distill_module, 'distillation_loss', loss)
    n, g = 4096, torch.Generator().manual_seed(0)
    distillation.v_loss({'mean': torch.randn([n, 4, 1, 1], generator=g),
                         'std': torch.full([n, 4, 1, 1], 0.1),
                         'embed': torch.randn([n, 512], generator=g)})
    (w,) = drawn
    assert w.shape == (n,) and w.min() >= 2.0 and w.max() <= 6.0
    assert w.min() < 2.05 and w.max() > 5.95  # spanning it (all but certain at 4096 draws)


@pytest.mark.parametrize('step, decay', [(0, 1 / 10), (5, 6 / 15), (90, 91 / 100),
                                         (1000, 0.99), (30_000, 0.999), (250_000, 0.9999)])
def test_the_distillation_ema_starts_short_then_follows_the_training_schedule(
        distillation, step, decay):
    """min((1 + step) / (10 + step), 0.99 to 20k steps, 0.999 to 200k, then 0.9999)."""
    assert distillation.ema_decay(step) == pytest.approx(decay, rel=1e-12)


@pytest.mark.parametrize('steps', [1, 4, 32])
def test_the_student_grid_is_its_ddim_timesteps_with_the_teachers_between(steps):
    """The student samples with DDIM on sampling_timesteps(steps), its teacher on
    sampling_timesteps(2 * steps): step i spans teacher steps 2i and 2i + 1."""
    t, t_mid, s = student_grid(steps, torch.arange(steps))
    ours, teachers = sampling_timesteps(steps), sampling_timesteps(2 * steps)
    torch.testing.assert_close(t, ours)
    torch.testing.assert_close(t_mid, teachers[1::2])
    torch.testing.assert_close(s, torch.cat([ours[1:], torch.zeros(1)]))
    torch.testing.assert_close(t, teachers[0::2])


@pytest.mark.parametrize('weighting', ['snr+1', 'truncated-snr'])
def test_the_loss_weighs_the_x0_error_as_salimans_and_ho(batch, weighting):
    """Salimans & Ho weigh the x0 error by 1 + SNR or max(SNR, 1). A student that predicts
    v = 0 has x0 = alpha x, the target's x0 is alpha x - sigma v_target."""
    x0, _, cond, w = batch
    u = torch.tensor([0.05, 0.3, 0.6, 0.9])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))

    def teacher(x, t, c):
        return torch.tanh(x) * (0.5 + t[:, None, None, None]) + c[:, :4, None, None]

    loss = distillation_loss(lambda x, t, c, w: torch.zeros_like(x), teacher, x0, cond, w, u,
                             noise, weighting=weighting)
    a, sg = (z.float() for z in cos_sin(u))
    x = a * x0 + sg * noise
    uncond, conditional = teacher(x, u, torch.zeros_like(cond)), teacher(x, u, cond)
    v_target = uncond + w[:, None, None, None] * (conditional - uncond)
    x0_error = (a * x - (a * x - sg * v_target)).pow(2).flatten(1).mean(1)
    snr = (a / sg).flatten() ** 2
    weight = 1 + snr if weighting == 'snr+1' else snr.clamp(min=1)
    torch.testing.assert_close(loss, (weight * x0_error).mean(), rtol=1e-4, atol=0)


def test_the_distilled_guidance_of_several_prompts_is_their_guidance():
    """sum_i (w_i / W) s(c_i, W) with s(c, w) = uncond + w (cond - uncond), the ideal
    student, is the guidance of the k prompts; with W = 0 the student's conditional v is
    guided as a plain model's."""
    def plain(x, t, c):
        return x * c[:, :1, None, None] + t[:, None, None, None] * c[:, 1:2, None, None]

    def ideal_student(x, t, c, w=1.0):
        w = torch.as_tensor(w).expand(t.shape)[:, None, None, None]
        uncond = plain(x, t, torch.zeros_like(c))
        return uncond + w * (plain(x, t, c) - uncond)

    x, t = torch.randn([3, 4, 8, 8]), torch.rand(3)
    embeds = torch.randn([2, 512])
    for weights in ([3.0], [2.0, 1.5], [4.0, -1.0], [1.0, -1.0]):
        torch.testing.assert_close(distilled_cfg_model_fn(ideal_student, embeds[:len(weights)],
                                                          weights)(x, t),
                                   cfg_model_fn(plain, embeds[:len(weights)], weights)(x, t))


def test_a_short_distillation_lands_nearer_the_latents_than_the_teachers_own_4_steps(
        learned_from_latents):
    """The learning problem's teacher (tests/learning.py), distilled as distill.py does
    for 60 steps of 8 a stage (guidance, then one round from 8 teacher steps to 4), guided
    at 3 as sample.py is: its 4 DDIM steps (4 calls) land closer to the latent of their
    condition than the teacher's own 4 guided DDIM steps (8 calls), which overshoot.
    Measured over seeds 0-3 on one thread: student RMS 0.36-0.46, teacher's DDIM-4 0.52
    (its PLMS-50, 118 calls, 0.36)."""
    run = learned_from_latents
    student = learning.distil(run.ema, learning.direct_batches(run.data, run.embeds, batch=8),
                              [None, 4], steps=60, lr=2e-4)
    noise = torch.randn([16, 4, 8, 8], generator=torch.Generator().manual_seed(1234))
    conds, targets = (z.repeat_interleave(8, 0) for z in (run.embeds, run.data))
    with torch.no_grad():
        ours, theirs = (sample_latents(fn(model, conds[None], [3.0]), noise,
                                       sampling_timesteps(4), 'ddim', progress=False)
                        for fn, model in ((distilled_cfg_model_fn, student),
                                          (cfg_model_fn, run.ema)))
    assert learning.rms(ours, targets) < 0.95 * learning.rms(theirs, targets), \
        (learning.rms(ours, targets), learning.rms(theirs, targets))
