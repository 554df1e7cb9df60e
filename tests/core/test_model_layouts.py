"""Model layouts (GPT-NeoX, GPT-2, Llama): MLP hooks, loading, fingerprints, the C2S shape."""

from __future__ import annotations

import itertools
import time

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from _models import (
    TINY_VOCAB,
    c2s_410m_shrunk,
    tiny_gemma2,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_family,
    tiny_neox,
    tiny_tokenizer,
)
from conftest import PYTHIA_TOKENIZER

from sctranscoder.core.evaluation import layer_metrics
from sctranscoder.core.hooks import capture_mlp_io, replace_mlp_outputs, run_to_layers
from sctranscoder.core.model import load_model, mlp_modules, model_fingerprint
from sctranscoder.core.sentences import PromptSettings, rank_genes
from sctranscoder.core.training import TrainingConfig, train_transcoders

BUILDERS = {
    "gpt_neox": tiny_neox,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "qwen2": tiny_llama_family,
    "gemma2": tiny_gemma2,
}
GENES = [
    ["CD3D", "HLA-DRB1", "LYZ", "S100A8"],
    ["MS4A1", "CD79A"],
    ["NKG7", "GNLY", "RP11-291B21.2"],
]


def _blocks(model):
    """The transformer blocks, found independently of ``mlp_modules``."""
    for attr in ("gpt_neox", "transformer", "model"):
        if hasattr(model, attr):
            base = getattr(model, attr)
            return base.h if attr == "transformer" else base.layers
    raise AssertionError(type(model).__name__)


def _prompt_ids(batch: int = 2, seq: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY_VOCAB, (batch, seq), generator=gen)
    return ids, torch.ones_like(ids)


def _output_of(module):
    """Forward hook recording a module's (first) output; returns the record and the handle."""
    seen = []

    def hook(_m, _inputs, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach())

    return seen, module.register_forward_hook(hook)


# -- MLP layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BUILDERS)
def test_mlp_modules_finds_every_block(arch):
    model = BUILDERS[arch](n_layers=3)
    mlps = mlp_modules(model)
    blocks = _blocks(model)
    assert len(mlps) == len(blocks) == 3
    assert all(mlp is block.mlp for mlp, block in zip(mlps, blocks, strict=True))


def test_mlp_modules_rejects_unknown_layouts():
    with pytest.raises(ValueError, match="supported"):
        mlp_modules(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("arch", BUILDERS)
def test_captured_output_is_the_mlp_of_the_captured_input(arch):
    model = BUILDERS[arch](n_layers=3)
    ids, mask = _prompt_ids()
    with capture_mlp_io(model, [0, 2]) as store:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(store) == [0, 2]
    for layer, (x, y) in store.items():
        assert x.shape == y.shape == (*ids.shape, 64)
        write = mlp_modules(model)[layer](x)
        if arch == "gemma2":  # what the MLP adds to the residual: after the post-feedforward norm
            write = _blocks(model)[layer].post_feedforward_layernorm(write)
        torch.testing.assert_close(y, write)


def test_gpt_neox_mlp_reads_the_normalised_layer_input():
    # parallel residual (Pythia): attention and MLP both read the layer's input
    model = tiny_neox(n_layers=3)
    ids, mask = _prompt_ids()
    with capture_mlp_io(model, [0, 1, 2]) as store:
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i, layer in enumerate(_blocks(model)):
        torch.testing.assert_close(store[i][0], layer.post_attention_layernorm(hidden[i]))


def test_gpt_neox_sequential_residual_mlp_reads_its_norm():
    model = tiny_neox(n_layers=2, parallel_residual=False)
    ids, mask = _prompt_ids()
    norms = [_output_of(layer.post_attention_layernorm) for layer in _blocks(model)]
    try:
        with capture_mlp_io(model, [0, 1]) as store:
            model(input_ids=ids, attention_mask=mask)
    finally:
        for _, handle in norms:
            handle.remove()
    for i, (seen, _) in enumerate(norms):
        assert torch.equal(store[i][0], seen[0])


def test_gpt2_mlp_reads_ln2_of_the_residual_after_attention():
    model = tiny_gpt2(n_layers=2)
    ids, mask = _prompt_ids()
    blocks = _blocks(model)
    attn = [_output_of(block.attn) for block in blocks]
    ln2 = [_output_of(block.ln_2) for block in blocks]
    try:
        with capture_mlp_io(model, [0, 1]) as store:
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = hidden.hidden_states
    finally:
        for _, handle in attn + ln2:
            handle.remove()
    for i, block in enumerate(blocks):
        assert torch.equal(store[i][0], ln2[i][0][0])
        residual = hidden[i] + attn[i][0][0]
        torch.testing.assert_close(store[i][0], block.ln_2(residual))


def test_llama_mlp_reads_post_attention_layernorm():
    model = tiny_llama(n_layers=2)
    ids, mask = _prompt_ids()
    blocks = _blocks(model)
    attn = [_output_of(block.self_attn) for block in blocks]
    norms = [_output_of(block.post_attention_layernorm) for block in blocks]
    try:
        with capture_mlp_io(model, [0, 1]) as store:
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = hidden.hidden_states
    finally:
        for _, handle in attn + norms:
            handle.remove()
    for i, block in enumerate(blocks):
        assert torch.equal(store[i][0], norms[i][0][0])
        residual = hidden[i] + attn[i][0][0]
        torch.testing.assert_close(store[i][0], block.post_attention_layernorm(residual))


def test_gemma2_transcoders_read_the_pre_norm_and_write_after_the_post_norm():
    """Input: pre_feedforward_layernorm of the residual after attention; output: what the
    block adds to it (post_feedforward_layernorm of the MLP), so replacing it is exact.
    """
    model = tiny_gemma2(n_layers=2)
    ids, mask = _prompt_ids()
    blocks = _blocks(model)
    attn = [_output_of(block.post_attention_layernorm) for block in blocks]
    try:
        with capture_mlp_io(model, [0, 1]) as store:
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for _, handle in attn:
            handle.remove()
    hidden = hidden.hidden_states
    for i, block in enumerate(blocks[:1]):
        x, y = store[i]
        mid = hidden[i] + attn[i][0][0]
        torch.testing.assert_close(x, block.pre_feedforward_layernorm(mid))
        torch.testing.assert_close(hidden[i + 1], mid + y)
    # a replaced output is what enters the residual stream
    with replace_mlp_outputs(model, {1: lambda x, y: torch.zeros_like(y)}):
        cut = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cut[1], hidden[1])
    assert not torch.allclose(cut[2], hidden[2])


@pytest.mark.parametrize("arch", BUILDERS)
def test_run_to_layers_stops_after_the_highest_captured_layer(arch):
    model = BUILDERS[arch](n_layers=3)
    ids, mask = _prompt_ids()
    mlps = mlp_modules(model)
    with capture_mlp_io(model, [0, 2]) as store:
        model(input_ids=ids, attention_mask=mask)
        full = {layer: tuple(t.clone() for t in io) for layer, io in store.items()}

    above, handle = _output_of(mlps[2])
    try:
        with capture_mlp_io(model, [0, 1]) as store:
            run_to_layers(model, ids, mask)
            assert sorted(store) == [0, 1]
            torch.testing.assert_close(store[0], full[0])
    finally:
        handle.remove()
    assert above == [], "the layer above the captured ones ran"
    # the model is left as it was: a plain forward pass runs to the end
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, TINY_VOCAB)


# -- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BUILDERS)
def test_load_model_directory_tokenizes_and_predicts(arch, tmp_path):
    BUILDERS[arch](tmp_path, n_layers=2)
    m = load_model(tmp_path)
    assert m.name == str(tmp_path.resolve())
    assert m.n_layers == 2
    assert m.d_model == 64
    assert m.settings == PromptSettings()
    assert not any(p.requires_grad for p in m.model.parameters())

    batch = m.tokenize(GENES)
    assert batch.input_ids.shape[0] == len(GENES)
    for row, genes in enumerate(GENES):
        present = set(batch.gene_index[row, : int(batch.lengths[row])].tolist())
        assert set(range(len(genes))) <= present

    answers = m.predict(GENES, max_new_tokens=4)
    assert len(answers) == len(GENES)
    assert all(isinstance(a, str) for a in answers)
    # batching (and so padding) does not change an answer
    assert answers == [m.predict([g], max_new_tokens=4)[0] for g in GENES]


def test_load_model_object_needs_tokenizer():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(model)
    m = load_model(model, tokenizer=tiny_tokenizer(), name="mine")
    assert m.name == "mine"
    assert m.model is model


def test_load_model_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny_c2s"):
        load_model(tmp_path / "no-such-model")


def test_load_model_directory_without_config_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json.*tiny_c2s"):
        load_model(tmp_path)


def test_load_model_applies_dtype_and_settings_to_a_model_object():
    m = load_model(
        tiny_neox(), tokenizer=tiny_tokenizer(), dtype="bfloat16", settings={"n_genes": 7}
    )
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}
    assert m.settings.n_genes == 7
    m = load_model(tiny_neox(), tokenizer=tiny_tokenizer(), dtype=torch.float16, device="cpu")
    assert {p.dtype for p in m.model.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match=r"Unknown prompt setting.*'n_gene'"):
        load_model(tiny_neox(), tokenizer=tiny_tokenizer(), settings={"n_gene": 7})


def test_load_model_unreachable_hub_id_points_to_tiny_c2s(monkeypatch, tmp_path):
    # offline: fail at once instead of retrying the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(OSError, match=r"sct\.datasets\.tiny_c2s\(\)"):
        load_model("sctranscoder-test/does-not-exist")
    assert time.perf_counter() - start < 10


def _unreachable_hub(monkeypatch, cache):
    """No HF_HUB_OFFLINE, an empty or given cache, and a hub endpoint that refuses at once."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


def test_uncached_hub_id_fails_at_once_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    _unreachable_hub(monkeypatch, tmp_path)
    import transformers

    def no_retries(*args, **kwargs):
        raise AssertionError("the hub client was asked (and would retry for ~23 s)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_retries)
    with pytest.raises(OSError, match=r"not in the Hugging Face cache.*tiny_c2s\(\)"):
        load_model("sctranscoder-test/not-cached")


def test_cached_hub_id_loads_from_the_cache_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    repo = tmp_path / "models--sctranscoder-test--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    tiny_gpt2(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    _unreachable_hub(monkeypatch, tmp_path)
    m = load_model("sctranscoder-test/tiny")
    assert m.name == "sctranscoder-test/tiny"
    assert m.fingerprint == load_model(snapshot).fingerprint


# -- identity ----------------------------------------------------------------------------------


def test_fingerprint_follows_the_weights(tmp_path):
    model = tiny_llama()
    same = tiny_llama()
    assert model_fingerprint(model) == model_fingerprint(same)
    assert model_fingerprint(model) != model_fingerprint(tiny_llama(seed=1))
    with torch.no_grad():
        same.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != model_fingerprint(same)


@pytest.mark.parametrize("arch", BUILDERS)
def test_fingerprint_survives_saving_and_loading(arch, tmp_path):
    model = BUILDERS[arch]()
    before = model_fingerprint(model)  # computed before the model is ever saved
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert load_model(tmp_path).fingerprint == before


# -- the real C2S architecture -----------------------------------------------------------------


def test_c2s_pythia_410m_architecture(pythia_tokenizer, pbmc, tmp_path):
    path = c2s_410m_shrunk(tmp_path / "c2s", PYTHIA_TOKENIZER, n_layers=2)
    m = load_model(path)
    assert (m.n_layers, m.d_model, m.max_length) == (2, 1024, 2048)
    assert m.settings == PromptSettings()  # no sctranscoder.json: the C2S defaults
    assert m.settings.n_genes == 200

    gene_lists = rank_genes(
        pbmc.raw.X[:6], pbmc.raw.var_names.str.upper(), n_genes=m.settings.n_genes
    )
    assert all(len(g) > 100 for g in gene_lists)
    batches = [m.tokenize(gene_lists[i : i + 2]) for i in (0, 2, 4)]
    for i, batch in enumerate(batches):
        for row, genes in enumerate(gene_lists[2 * i : 2 * i + 2]):
            assert set(range(len(genes))) <= set(batch.gene_index[row].tolist())

    config = TrainingConfig(
        expansion_factor=1, k=16, batch_size=256, n_tokens=1024, buffer_tokens=1024
    )
    stream = itertools.cycle([(b.input_ids, b.attention_mask) for b in batches[:2]])
    tcs, log = train_transcoders(
        m.model, stream, layers=[0, 1], config=config, d_in=1024, d_out=1024, progress=False
    )
    assert log.tokens == 1024
    for tc in tcs.values():
        assert tc.config.n_features == 1024
        assert tc.config.k == 16
        assert tc.W_enc.shape == tc.W_dec.shape == (1024, 1024)
        assert tc.b_dec.shape == (1024,)

    held = batches[2]
    metrics = layer_metrics(
        m.model, tcs, [(held.input_ids, held.attention_mask)], device=torch.device("cpu")
    )
    for layer in (0, 1):
        values = metrics[layer]
        assert np.isfinite(list(values.values())).all()
        assert values["n_tokens"] == int(held.attention_mask.sum())
        assert 0 < values["l0"] <= 16
