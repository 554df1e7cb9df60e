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


def _jitter_norms(model, seed: int) -> None:
    """Random norm weights (and biases): Llama initialises them to 1 and Gemma to 0 (read as
    ``1 + w``), which would hide a norm applied the wrong way.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def tiny_llama_family(
    tmp_path=None,
    *,
    kind: str = "qwen2",
    n_layers: int = 2,
    d: int = 64,
    heads: int = 4,
    vocab: int = TINY_VOCAB,
    sliding_window: int | None = None,
    seed: int = 0,
):
    """A random Mistral (``kind="mistral"``, optionally with a short sliding window) or Qwen2
    (``kind="qwen2"``: biases on queries, keys and values), with random norm weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        kind,
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        sliding_window=sliding_window,
        use_sliding_window=sliding_window is not None,
        max_window_layers=0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.2)
    _jitter_norms(model, seed)
    return _finish(model, tmp_path)


def tiny_gemma2(
    tmp_path=None,
    *,
    n_layers: int = 2,
    d: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    vocab: int = TINY_VOCAB,
    sliding_window: int = 4,
    seed: int = 0,
):
    """A random Gemma-2 with every special setting: pre- and post-norms ``(1 + w)``, GeGLU,
    scaled embeddings, grouped-query attention with ``head_dim != d / heads``, logit soft-caps
    (attention 50, final 30) and a short sliding window on even layers (so that it matters).
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=4 * d,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config)
    _jitter_norms(model, seed)
    return _finish(model, tmp_path)


def gene_sentencepiece_tokenizer(genes, *, vocab_size: int = 400):
    """A SentencePiece-style fast tokenizer (Unigram, Metaspace: a leading "▁" instead of a
    space) trained here on gene symbols and the C2S prompt text, like Gemma's tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sctranscoder.core.sentences import PromptSettings, format_prompt

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    settings = PromptSettings(n_genes=len(genes))
    corpus = [format_prompt(list(genes[i : i + 20]), settings) for i in range(0, len(genes), 7)]
    corpus += [" " + g for g in ("B cell", "T cell", "NK cell", "monocyte")]
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.:,"),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def c2s_scale_gemma2_config(vocab_size: int, n_layers: int, *, eos: int = 0, pad: int = 1):
    """The config of ``vandijklab/C2S-Scale-Gemma-2-2B``, ``n_layers`` deep, with a small vocabulary.

    Same widths and settings: d_model 2304, d_mlp 9216, 8 query heads, 4 key/value heads,
    head_dim 256, query scale 256, sliding window 4096 on every other layer, attention soft-cap
    50, final soft-cap 30, RMSNorm eps 1e-6, GeGLU (tanh GELU).
    """
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=n_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def c2s_scale_gemma2_shrunk(path, tokenizer, n_layers: int = 2, *, seed: int = 0):
    """A random Gemma-2 with the C2S-Scale-Gemma-2-2B architecture (see
    :func:`c2s_scale_gemma2_config`) and ``tokenizer``; saved to ``path``, or returned when
    ``path`` is None.
    """
    from transformers import Gemma2ForCausalLM

    config = c2s_scale_gemma2_config(
        len(tokenizer), n_layers, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config).eval().requires_grad_(False)
    _jitter_norms(model, seed)
    if path is None:
        return model
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
