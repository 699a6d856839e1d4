"""CLIP BPE tokenization for the CLOOB text encoder.

Uses open_clip's tokenizer and the BPE vocabulary that ships inside the open_clip wheel, so
nothing is downloaded. Over-long prompts are truncated with a warning instead of raising:
a raise at sampling time would throw away the run that asked for the prompt.
"""

import functools
import importlib.util
import warnings

import torch

SOT = 49406
EOT = 49407


@functools.lru_cache(maxsize=None)
def _tokenizer():
    """Loads open_clip/tokenizer.py on its own: importing the open_clip package takes seconds
    (it pulls in timm and its model zoo), the tokenizer module needs none of that. Should a
    later open_clip make that module depend on the package, the plain import still works."""
    try:
        spec = importlib.util.find_spec('open_clip')
        path = next(iter(spec.submodule_search_locations)) + '/tokenizer.py'
        spec = importlib.util.spec_from_file_location('_ccld_open_clip_tokenizer', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        from open_clip import tokenizer as module
    return module.SimpleTokenizer()


def tokenize(texts, context_length=77):
    """Returns LongTensor [len(texts), context_length]: SOT, BPE ids, EOT, zero padding."""
    if isinstance(texts, str):
        texts = [texts]
    tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = _tokenizer().encode(text)
        if len(ids) > context_length - 2:
            warnings.warn(f'prompt truncated to its first {context_length - 2} of {len(ids)} '
                          f'tokens: {text!r}', stacklevel=2)
            ids = ids[:context_length - 2]
        ids = [SOT, *ids, EOT]
        tokens[i, :len(ids)] = torch.tensor(ids)
    return tokens
