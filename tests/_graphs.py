"""Helpers of the circuit tests (and benchmarks): random transcoders, exactness of a graph.

Not a test module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sctranscoder._constants import NodeType
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig


def _family_builders() -> dict:
    from _models import tiny_gemma2, tiny_gpt2, tiny_llama, tiny_llama_family, tiny_neox

    return {
        "gpt_neox_parallel": lambda: tiny_neox(n_layers=3),
        "gpt_neox_sequential": lambda: tiny_neox(n_layers=3, parallel_residual=False),
        "llama": lambda: tiny_llama(n_layers=3),
        "mistral_sliding_window_4": lambda: tiny_llama_family(
            kind="mistral", n_layers=3, sliding_window=4
        ),
        "qwen2_qkv_bias": lambda: tiny_llama_family(kind="qwen2", n_layers=3),
        "gemma2": lambda: tiny_gemma2(n_layers=3),
        "gpt2": lambda: tiny_gpt2(n_layers=3),
    }


#: A random 3-layer model (d 64) of every layout circuits trace: both GPT-NeoX residual layouts,
#: Llama, Mistral with a sliding window of 4, Qwen2 with QKV biases, Gemma-2 with every special
#: setting, GPT-2.
FAMILIES = _family_builders()


def random_transcoders(model, *, expansion: int = 2, k: int = 8, seed: int = 0) -> dict:
    """Untrained transcoders with non-zero biases on every layer of a Hugging Face ``model``:
    exactness must hold whatever the transcoders are.
    """
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    cfg = TranscoderConfig(d_in=d, d_out=d, n_features=expansion * d, k=k)
    out = {}
    for i in range(model.config.num_hidden_layers):
        tc = Transcoder(cfg, generator=gen)
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.1, generator=gen)
            tc.b_dec.normal_(0, 0.1, generator=gen)
        out[i] = tc.eval().requires_grad_(False)
    return out


def assert_exact(graph, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Every explored node: incoming edges (all sources) + bias == its value; an active
    feature's value (its pre-activation) is its activation.
    """
    assert len(graph.rows) > 1
    for n, row in graph.rows.items():
        total = float(row.astype(np.float64).sum()) + graph.bias[n]
        assert total == pytest.approx(graph.value[n], rel=rtol, abs=atol), n
        if graph.node_type[n] == NodeType.FEATURE:
            assert graph.value[n] == pytest.approx(float(graph.activation[n]), rel=1e-4, abs=1e-5)
