"""Inputs of the side-by-side circuit benchmark with circuit-tracer: a tiny random Llama, random
transcoders for it and a prompt, written once and read by both sides.

Run with sctranscoder's environment; the circuit-tracer half (``circuit_tracer_compare_ct.py``)
runs in a separate one (circuit-tracer pins ``transformers<=4.57.3``)::

    .venv/bin/python benchmarks/circuit_tracer_fixture.py --out /tmp/ct_side_by_side
    /tmp/ctvenv/bin/python benchmarks/circuit_tracer_compare_ct.py --dir /tmp/ct_side_by_side

``--out`` then holds:

* ``model/``: a ``LlamaForCausalLM`` (``save_pretrained``; 2 layers, hidden 64, 4 heads, 2
  key-value heads, MLP 128 by default) with the embedded model's tokenizer (the GPT-NeoX-style
  BPE of ``sct.datasets.tiny_c2s()``, 640 tokens), loadable by transformers 4.57 and 5.x;
* ``transcoders_sct/``: random ReLU transcoders on every layer (``TranscoderSet.save``; the
  model's fingerprint recorded), for sctranscoder;
* ``transcoders_ct/``: the same weights written by ``sct.export_circuit_tracer_transcoders``,
  for circuit-tracer;
* ``prompt.json``: ``token_ids`` (a BOS token, then a cell sentence prompt of ``--n-genes``
  genes: circuit-tracer prepends a special token unless the prompt starts with one, and zeroes
  the features at position 0, so both sides should read exactly these ids and compare from
  position 1), their decoded ``tokens``, ``target_token_id`` (the model's most likely next
  token) and ``reference_logits`` (the top logits at the last position, computed here, for the
  other side to check that it runs the same model).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import scanpy as sc
import torch

import sctranscoder as sct
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig

TINY = Path(sct.__file__).parent / "datasets" / "tiny_c2s"


def build_model(out: Path, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((TINY / "tokenizer.json").read_text())
    n_vocab = len(vocab["model"]["vocab"]) + sum(
        t["id"] >= len(vocab["model"]["vocab"]) for t in vocab["added_tokens"]
    )
    config = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024,
        initializer_range=0.1,  # larger than the default 0.02: activations that vary
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    shutil.copy(TINY / "tokenizer.json", out / "tokenizer.json")
    # a tokenizer_config that transformers 4.57 (circuit-tracer's) and 5.x both read
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|padding|>",
                "model_max_length": 1024,
            },
            indent=2,
        )
    )


def random_transcoders(model: sct.C2SModel, args) -> sct.TranscoderSet:
    g = torch.Generator().manual_seed(args.seed)
    d = model.d_model
    layers = {}
    for la in range(model.n_layers):
        c = TranscoderConfig(
            d_in=d,
            d_out=d,
            n_features=args.n_features,
            activation="topk" if args.topk else "relu",
            k=args.topk or 32,
        )
        tc = Transcoder(c, generator=g)
        with torch.no_grad():
            tc.b_enc.fill_(-1.5)  # a few percent of the features active per token
            tc.W_dec.mul_(0.1)
            tc.b_dec.normal_(0, 0.01, generator=g)
        layers[la] = tc
    return sct.TranscoderSet(layers, model=model.record())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--n-features", type=int, default=512)
    p.add_argument("--topk", type=int, default=0, help="TopK transcoders with this k (0: ReLU)")
    p.add_argument("--n-genes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    build_model(out / "model", args)

    tiny = sct.datasets.tiny_c2s()
    settings = {**tiny.settings.to_dict(), "n_genes": args.n_genes}
    model = sct.load_model(str(out / "model"), settings=settings, name=str(out / "model"))
    tset = random_transcoders(model, args)
    tset.save(out / "transcoders_sct")
    sct.export_circuit_tracer_transcoders(
        tset, out / "transcoders_ct", model_name=str((out / "model").resolve()), allow_topk=True
    )

    adata = sc.datasets.pbmc68k_reduced()[:1].copy()
    sct.pp.cell_sentences(adata, model=tiny)
    genes = adata.obs["cell_sentence"].iloc[0].split()[: args.n_genes]
    prompt = model.tokenize([genes])
    ids = [0, *prompt.input_ids[0, : int(prompt.lengths[0])].tolist()]  # BOS first
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([ids])).logits[0, -1]
    top = torch.topk(logits, 5)
    doc = {
        "token_ids": ids,
        "tokens": [model.tokenizer.decode([t]) for t in ids],
        "genes": genes,
        "cell": str(adata.obs_names[0]),
        "target_token_id": int(top.indices[0]),
        "reference_logits": {
            "token_ids": top.indices.tolist(),
            "values": top.values.tolist(),
            "mean": float(logits.mean()),
        },
        "model_fingerprint": model.fingerprint,
    }
    (out / "prompt.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"written to {out}: model/, transcoders_sct/, transcoders_ct/, prompt.json ({len(ids)} tokens)"
    )


if __name__ == "__main__":
    main()
