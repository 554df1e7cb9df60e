from __future__ import annotations

from pathlib import Path

import pytest
import scanpy as sc

#: The real GPT-NeoX-20B tokenizer of Pythia (and so of C2S-Pythia), kept beside the repository.
PYTHIA_TOKENIZER = (
    Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "pythia_20B_tokenizer.json"
)


@pytest.fixture
def pbmc():
    """700 PBMCs x 765 genes; ``.X`` is scaled, ``.raw`` log-normalised (shipped with scanpy)."""
    return sc.datasets.pbmc68k_reduced()


@pytest.fixture(scope="session")
def pythia_tokenizer():
    if not PYTHIA_TOKENIZER.exists():
        pytest.skip(
            "shared/assets/pythia_20B_tokenizer.json not found: the real Pythia tokenizer lives "
            "in ../shared beside the repo"
        )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(PYTHIA_TOKENIZER), eos_token="<|endoftext|>")
