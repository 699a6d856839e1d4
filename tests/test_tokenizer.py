import warnings

import pytest
import torch

from cloob_training.tokenizer import tokenize
from conftest import FIXTURES

GOLDEN = torch.load(FIXTURES / 'tokenizer_golden.pt', weights_only=False)


@pytest.mark.parametrize('i', range(len(GOLDEN['prompts'])))
def test_golden_ids(i):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the last prompt is over-long on purpose
        tokens = tokenize(GOLDEN['prompts'][i])
    assert tokens.tolist() == GOLDEN['tokens'][i:i + 1].tolist()


def test_batch_matches_golden():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert torch.equal(tokenize(GOLDEN['prompts']), GOLDEN['tokens'])
