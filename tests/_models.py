"""Tiny random causal LMs for tests: one per supported layout, plus the real C2S architecture.

Not a test module. Every builder seeds torch, so the same arguments give the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: The embedded model's tokenizer (byte-level BPE, ~600 tokens, eos 0, pad 1): small and offline.
TINY_TOKENIZER_DIR = (
    Path(__file__).resolve().parents[1] / "src" / "sctranscoder" / "datasets" / "tiny_c2s"
)
#: Vocabulary of the tiny models: room for every id of the tiny tokenizer.
TINY_VOCAB = 640


def random_prompts(seed: int, *, batch: int = 8, seq: int = 48):
    """Endless random prompt batches over the tiny vocabulary, right-padded (pad id 1) to random
    lengths: ``(input_ids, attention_mask)``.
    """
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(2, TINY_VOCAB, (batch, seq), generator=gen)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        yield ids.masked_fill(mask == 0, 1), mask


def tiny_tokenizer():
    """The embedded model's fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))


def _finish(model, tmp_path):
    """Eval mode, frozen; with ``tmp_path``, also save the model and the tiny tokenizer there."""
    model.eval().requires_grad_(False)
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        tiny_tokenizer().save_pretrained(tmp_path)
    return model


def tiny_neox(
    tmp_path=None,
    *,
    n_layers: int = 2,
    d: int = 64,
    heads: int = 4,
    vocab: int = TINY_VOCAB,
    parallel_residual: bool = True,
    seed: int = 0,
):
    """A random GPT-NeoX (Pythia layout: partial rotary, parallel residual by default)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        intermediate_size=4 * d,
        max_position_embeddings=512,
        rotary_pct=0.25,
        use_parallel_residual=parallel_residual,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return _finish(GPTNeoXForCausalLM(config), tmp_path)


def tiny_gpt2(
    tmp_path=None,
    *,
    n_layers: int = 2,
    d: int = 64,
    heads: int = 4,
    vocab: int = TINY_VOCAB,
    seed: int = 0,
):
    """A random GPT-2 (sequential residual, ``ln_2`` before the MLP, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=512,
        n_embd=d,
        n_layer=n_layers,
        n_head=heads,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(config), tmp_path)


def tiny_llama(
    tmp_path=None,
    *,
    n_layers: int = 2,
    d: int = 64,
    heads: int = 4,
    vocab: int = TINY_VOCAB,
    seed: int = 0,
):
    """A random Llama (RMSNorm, gated MLP, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config), tmp_path)


def c2s_410m_shrunk(path, tokenizer_file, n_layers: int = 2, *, seed: int = 0) -> Path:
    """Save a random GPT-NeoX with the C2S-Pythia-410m architecture, ``n_layers`` deep, to ``path``.

    Same widths, heads, rotary fraction, residual layout, vocabulary and context as
    ``vandijklab/C2S-Pythia-410m-cell-type-prediction``, saved with the real Pythia tokenizer and
    no ``sctranscoder.json`` (so the C2S prompt defaults apply).
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=1024,
        num_hidden_layers=n_layers,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        rotary_pct=0.25,
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(path)
    return path
