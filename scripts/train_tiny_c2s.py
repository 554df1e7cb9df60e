"""Train the embedded default model, ``sct.datasets.tiny_c2s()``, deterministically.

A small GPT-NeoX (parallel residual, partial rotary, like Pythia) with its own byte-level BPE
tokenizer that splits gene symbols into subwords, trained as a causal LM on Cell2Sentence
cell-type prompts built from scanpy's ``pbmc68k_reduced`` (``.raw``: log-normalised expression of
765 genes; labels: ``obs['bulk_labels']``).

Held-out cells (a fixed, stratified 20% split, seed 0) are never trained on; their greedy
cell-type accuracy is measured at the end and written to the model card.

    python scripts/train_tiny_c2s.py --out src/sctranscoder/datasets/tiny_c2s

Seeded throughout, with deterministic torch kernels and a fixed thread count (2), so the same machine and library versions give the same
weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import scanpy as sc
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from sctranscoder.core.model import SETTINGS_FILE, C2SModel
from sctranscoder.core.sentences import PromptSettings, cell_ids, format_prompt, rank_genes

EOS, PAD = "<|endoftext|>", "<|padding|>"
SEED = 0


def heldout_split(labels: np.ndarray, frac: float = 0.2, seed: int = SEED) -> np.ndarray:
    """Boolean mask of held-out cells: ``frac`` of every label, at least one, seeded."""
    rng = np.random.default_rng(seed)
    test = np.zeros(labels.size, dtype=bool)
    for lab in sorted(set(labels)):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        test[idx[: max(1, round(frac * idx.size))]] = True
    return test


def build_tokenizer(genes: list[str], labels: list[str], settings: PromptSettings, vocab_size: int):
    """Byte-level BPE (as GPT-NeoX) trained on each gene symbol once, so symbols split into subwords."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = settings.template.format(n_genes=100, organism=settings.organism, genes="X")
    corpus = [" " + g for g in genes] + [text] * 50 + [" " + lab for lab in labels] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS
    )
    return fast


def encode_example(tok, genes: list[str], label: str, settings: PromptSettings):
    prompt = format_prompt(genes, settings)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(settings.answer_prefix + label, add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    return p_ids, a_ids


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("src/sctranscoder/datasets/tiny_c2s"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument(
        "--n-genes", type=int, default=100, help="genes per sentence recorded as default"
    )
    ap.add_argument("--min-genes", type=int, default=32, help="shortest sentence seen in training")
    ap.add_argument("--max-genes", type=int, default=200, help="longest sentence seen in training")
    ap.add_argument("--vocab-size", type=int, default=600)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--evaluate-only",
        action="store_true",
        help="skip training; re-measure held-out accuracy of the model in --out and rewrite its card",
    )
    args = ap.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    adata = sc.datasets.pbmc68k_reduced()
    X = adata.raw.X
    genes = [g.upper() for g in adata.raw.var_names]
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    label_names = sorted(set(labels))
    test = heldout_split(labels)
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    settings = PromptSettings(n_genes=args.n_genes)

    if args.evaluate_only:
        # re-measure the card from the weights already in --out (they are not rewritten)
        model = GPTNeoXForCausalLM.from_pretrained(args.out)
        tok = PreTrainedTokenizerFast.from_pretrained(args.out)
        n_params = sum(p.numel() for p in model.parameters())
        train_seconds = json.loads((args.out / SETTINGS_FILE).read_text())["info"]["train_seconds"]
    else:
        tok = build_tokenizer(genes, label_names, settings, args.vocab_size)
        vocab = int(math.ceil(len(tok) / 64) * 64)
        config = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=args.d_model,
            num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads,
            intermediate_size=4 * args.d_model,
            rotary_pct=0.25,
            max_position_embeddings=1024,
            use_parallel_residual=True,
            hidden_act="gelu",
            tie_word_embeddings=False,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = GPTNeoXForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"tokenizer: {len(tok)} tokens; model: {n_params / 1e6:.2f}M parameters")

        # Full rankings once; each epoch re-breaks ties with a new seed (ties are arbitrary) and
        # truncates each sentence to a random length in [min_genes, max_genes] (augmentation).
        steps_per_epoch = math.ceil(train_idx.size / args.batch_size)
        total = steps_per_epoch * args.epochs
        opt = torch.optim.AdamW(
            model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95)
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
            ),
        )
        rng = np.random.default_rng(SEED)
        model.train()
        step = 0
        for epoch in range(args.epochs):
            ranked = rank_genes(
                X[train_idx], genes, n_genes=None, seed=1000 + epoch, row_ids=train_idx
            )
            order = rng.permutation(train_idx.size)
            ep_loss, ep_ans = 0.0, 0.0
            for b in range(steps_per_epoch):
                sel = order[b * args.batch_size : (b + 1) * args.batch_size]
                seqs, ans_start = [], []
                for j in sel:
                    n = int(rng.integers(args.min_genes, args.max_genes + 1))
                    p_ids, a_ids = encode_example(
                        tok, ranked[j][:n], labels[train_idx[j]], settings
                    )
                    seqs.append(p_ids + a_ids)
                    ans_start.append(len(p_ids))
                L = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), L), tok.pad_token_id)
                mask = torch.zeros((len(seqs), L), dtype=torch.long)
                is_answer = torch.zeros((len(seqs), L), dtype=torch.bool)
                for i, s in enumerate(seqs):
                    ids[i, : len(s)] = torch.as_tensor(s)
                    mask[i, : len(s)] = 1
                    is_answer[i, ans_start[i] : len(s)] = True
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                target, tmask, amask = ids[:, 1:], mask[:, 1:].bool(), is_answer[:, 1:]
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
                ).view_as(target)
                prompt_loss = nll[tmask & ~amask].mean()
                answer_loss = nll[amask].mean()
                # The sentence (gene co-expression) and the answer count equally.
                loss = prompt_loss + answer_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                ep_loss += prompt_loss.item() / steps_per_epoch
                ep_ans += answer_loss.item() / steps_per_epoch
            print(
                f"epoch {epoch + 1}/{args.epochs}: sentence CE {ep_loss:.3f}, answer CE {ep_ans:.3f}, "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )

        train_seconds = time.time() - t0
    model.eval()
    c2s = C2SModel(
        model=model, tokenizer=tok, settings=settings, name="tiny_c2s", labels=label_names
    )
    results = {}
    truth = labels[test_idx]
    for n in (args.n_genes, 200, 64):
        # the sentences `sct.pp.cell_sentences` gives (tie-breaks seeded by cell name)
        sentences = rank_genes(
            X[test_idx], genes, n_genes=n, seed=0, row_ids=cell_ids(adata.obs_names[test_idx])
        )
        pred = np.asarray(c2s.predict(sentences))
        acc = float(np.mean(pred == truth))
        results[n] = acc
        print(f"held-out accuracy at {n} genes: {acc:.3f}")
    train_counts = {lab: int(np.sum(labels[train_idx] == lab)) for lab in label_names}
    majority_label = max(train_counts, key=train_counts.get)
    majority_acc = float(np.mean(truth == majority_label))
    elapsed = train_seconds

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.evaluate_only:
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / "generation_config.json").unlink(missing_ok=True)
    (out / "heldout_cells.txt").write_text("\n".join(adata.obs_names[test_idx]) + "\n")
    record = {
        "prompt": settings.to_dict(),
        "labels": label_names,
        "info": {
            "dataset": "scanpy.datasets.pbmc68k_reduced (.raw, obs['bulk_labels'])",
            "heldout": "heldout_cells.txt (stratified 20%, seed 0)",
            "heldout_accuracy": {str(k): v for k, v in results.items()},
            "majority_class_accuracy": majority_acc,
            "majority_class": majority_label,
            "n_train_cells": int(train_idx.size),
            "n_heldout_cells": int(test_idx.size),
            "train_args": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k not in ("out", "evaluate_only")
            },
            "train_seconds": round(elapsed, 1),
            "torch": torch.__version__,
        },
    }
    (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    card = (
        f"""# tiny_c2s: the embedded default model of sctranscoder

A small Cell2Sentence-style causal language model, trained by `scripts/train_tiny_c2s.py` (seeded,
deterministic torch kernels, {args.threads} threads) in {elapsed / 60:.1f} minutes of wall time on a
shared 2-core CPU machine, so that sctranscoder works offline.
It is a stand-in for `vandijklab/C2S-Pythia-410m-cell-type-prediction`, with the same kind of
architecture and prompt, not a model for biological conclusions of its own.

- **Architecture**: GPT-NeoX (as Pythia): {args.n_layers} layers, d_model {args.d_model}, {args.n_heads} heads,
  d_ff {4 * args.d_model}, parallel residual, rotary on 25% of each head, untied embeddings;
  {n_params / 1e6:.2f}M parameters, float32 safetensors.
- **Tokenizer**: byte-level BPE with {len(tok)} entries, trained on the 765 gene symbols once each,
  so symbols split into subwords as in Pythia's tokenizer.
- **Data**: `scanpy.datasets.pbmc68k_reduced()`, `.raw` (log-normalised, 765 genes), labels
  `obs['bulk_labels']` ({len(label_names)} types). Train: {train_idx.size} cells; held out:
  {test_idx.size} cells (stratified 20%, seed 0; listed in `heldout_cells.txt`).
- **Prompt**: the C2S cell-type prediction template; {args.min_genes}-{args.max_genes} genes per
  sentence in training (ties re-broken each epoch), **{args.n_genes} by default** (recorded in
  `{SETTINGS_FILE}`, used by every sctranscoder tool unless told otherwise).
- **Objective**: next-token cross-entropy on the sentence plus on the answer (`" <label><|endoftext|>"`),
  {args.epochs} epochs, AdamW lr {args.lr}, batch {args.batch_size}.

## Held-out cell-type accuracy (greedy answer, exact match)

| genes per sentence | accuracy |
| --- | --- |
"""
        + "".join(f"| {k} | {v:.3f} |\n" for k, v in results.items())
        + f"""
Majority class of the training cells ({majority_label}): {majority_acc:.3f} on the same held-out cells.
`tests/datasets/test_tiny_c2s.py` re-measures the accuracy from the shipped weights.
"""
    )
    (out / "README.md").write_text(card)
    print(json.dumps(record["info"], indent=2))


if __name__ == "__main__":
    main()
