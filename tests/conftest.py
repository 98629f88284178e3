import os
import tempfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `datasets` loaders (imagefolder) keep copies in their cache: a throwaway one, so tests leave no files behind
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="plan2img-datasets-"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
