"""Helpers of the circuit tests (and benchmarks): random transcoders, exactness of a graph.

Not a test module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sctranscoder._constants import NodeType
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig


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
