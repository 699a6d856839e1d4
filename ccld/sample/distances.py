"""How far apart two sets of image features are: the Frechet distance (FID, when the
features are InceptionV3's) and the kernel distance (KID).

The maths is torch-fidelity's, whose values match the reference implementations (TTUR's
FID, the MMD-GAN code's KID) to machine precision; this module only feeds it features
and chooses the KID subsets for sets smaller than its default subset size.

- Frechet distance: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the
  Gaussians fitted to the two sets. Biased upwards for small sets, so it compares models
  only at equal, large sample counts.
- KID: the unbiased estimate of the squared MMD under the polynomial kernel
  (x.y / d + 1)^3, averaged over random subsets of equal size; 0 in expectation for two
  samples of one distribution, whatever their size.
"""

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torch-fidelity's default
KID_SEED = 2020  # the subsets are drawn from a fixed stream, so reruns agree


def statistics(features):
    """The mean [d] and covariance [d, d] of features [n, d] (n >= 2), in float64."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    stats = fid_features_to_statistics(torch.as_tensor(features, dtype=torch.float64))
    return stats['mu'], stats['sigma']


def frechet_distance(stats_a, stats_b):
    """The Frechet distance between the Gaussians of two (mean, covariance) pairs."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    (mu_a, sigma_a), (mu_b, sigma_b) = stats_a, stats_b
    return fid_statistics_to_metric({'mu': mu_a, 'sigma': sigma_a},
                                    {'mu': mu_b, 'sigma': sigma_b}, verbose=False)[KEY_METRIC_FID]


def kernel_distance(features_a, features_b, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                    seed=KID_SEED):
    """KID: (mean, standard deviation) over `subsets` random subsets of min(subset_size,
    both set sizes) features of each set, or None when a set has fewer than two."""
    from torch_fidelity.metric_kid import (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                           kid_features_to_metric)
    size = min(subset_size, len(features_a), len(features_b))
    if size < 2:
        return None
    kid = kid_features_to_metric(torch.as_tensor(np.asarray(features_a, np.float64)),
                                 torch.as_tensor(np.asarray(features_b, np.float64)),
                                 kid_subsets=subsets, kid_subset_size=size, rng_seed=seed,
                                 verbose=False)
    return kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
