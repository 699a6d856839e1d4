"""Training learns what it should: the objective, the condition dropout, the EMA and the
sampler agree on what v is.

A DiffusionModel is trained (150 steps of 16) with the training module's v_objective and
EMA on the problem of tests/learning.py, whose answers are known: once on the latents
themselves, and once on records of them in a latent cache (posterior spread 0.02) read
back as training reads them. Measured over seeds 0-3
with 1 and 2 threads (the float sums, and so the weights, depend on the thread count),
clean code gives: dropped conditions 0.193-0.213; conditional v MSE 0.052-0.084;
unconditional 0.148-0.214; worst sample RMS from its latent 0.20-0.28, own/other distance
0.14-0.18; loss falls 7.8-8.4x. The bounds below sit 2-3x outside that spread. The bugs
they must catch land far on the other side: dropout 0.0 drops 0% (unconditional MSE 0.72),
dropout 0.8 drops 81%, and alpha/sigma swapped in the objective gives a conditional MSE
of 0.81.
"""

import pytest
import torch

import learning
from ccld.diffusion.guidance import cfg_model_fn
from ccld.diffusion.sampling import plms_sample
from ccld.diffusion.schedule import sampling_timesteps


@pytest.fixture(scope='module', params=['latents', 'cache'])
def learned(request, tmp_path_factory):
    if request.param == 'latents':
        return request.getfixturevalue('learned_from_latents')
    data, embeds = learning.problem()
    batches = learning.cached_batches(tmp_path_factory.mktemp('cache'), data, embeds)
    run = learning.train(batches)
    run.data, run.embeds = data, embeds
    return run


def test_the_loss_falls(learned):
    first, last = (sum(learned.losses[s]) / 20 for s in (slice(0, 20), slice(-20, None)))
    assert last < first / 4, (first, last)


def test_a_fifth_of_the_conditions_are_dropped(learned):
    # 2400 examples: the binomial standard deviation is 0.008.
    assert 0.15 < learned.dropped < 0.25, learned.dropped


def test_the_ema_model_predicts_v_with_and_without_its_condition(learned):
    errors = learning.denoising_errors(learned.ema, learned.data, learned.embeds)
    assert errors.cond < 0.25, errors
    assert errors.uncond < 0.4, errors


def test_ema_samples_land_on_the_latent_of_their_condition(learned):
    noise = torch.randn([4, 4, 8, 8], generator=torch.Generator().manual_seed(1234))
    for k in range(2):
        model_fn = cfg_model_fn(learned.ema, learned.embeds[k:k + 1], [1.0])  # conditional
        out = plms_sample(lambda x, t: model_fn(x, t), noise, sampling_timesteps(20), {},
                          progress=False)
        for sample in out:
            assert learning.rms(sample, learned.data[k]) < 0.45
            own, other = ((sample - learned.data[j]).norm() for j in (k, 1 - k))
            assert own < other / 3, (own, other)
