"""The interpretability summary of an annotation, beside its baselines."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._constants import Key
from .._records import record, record_kind

if TYPE_CHECKING:
    from anndata import AnnData

#: Prefix of the columns taken from a random-model baseline.
RANDOM_MODEL = "random_model_"
#: Prefix of the columns taken from a neuron baseline.
NEURONS = "neurons_"
#: Baselines joined to the summary: record kind, its name in messages, default key (derived from
#: the annotation's), the tool that writes it, column prefix.
_BASELINES = (
    ("random model baseline", "random-model baseline", "random_model", "random_model_baseline",
     RANDOM_MODEL),
    ("neuron baseline", "neuron baseline", "neurons", "neuron_baseline", NEURONS),
)  # fmt: skip


def interpretability(
    adata: AnnData,
    *,
    annotation_key: str = Key.derived(Key.activations(Key.transcoders), "annotation"),
    random_model_key: str | None = None,
    neurons_key: str | None = None,
) -> pd.DataFrame:
    """Per layer: how many live features are interpretable, with every baseline beside it.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.annotate_features`.
    annotation_key
        ``adata.uns`` key of the annotation.
    random_model_key
        ``adata.uns`` key of a :func:`sctranscoder.tl.random_model_baseline` result; default:
        its default key, when present.
    neurons_key
        ``adata.uns`` key of a :func:`sctranscoder.tl.neuron_baseline` result; default: its
        default key, when present.

    Returns
    -------
    The annotation's summary (``layer``, ``total_live``, ``ora_*`` and/or ``gsea_*`` columns;
    see :func:`sctranscoder.tl.annotate_features`), joined on ``layer`` with the random model's
    summary columns prefixed ``random_model_`` and the MLP neurons' prefixed ``neurons_`` (e.g.
    ``neurons_ora_fraction`` and its shuffled-label ``neurons_ora_baseline_fraction``) when there
    are such results (``seconds`` columns left out).
    """
    ann = record(adata, annotation_key, kind="annotation", hint="run `sct.tl.annotate_features`.")
    if "summary" not in ann:
        raise KeyError(f"adata.uns[{annotation_key!r}] is not an annotation record.")
    table = pd.DataFrame(ann["summary"]).copy()
    given_keys = (random_model_key, neurons_key)
    for (kind, label, derived, tool, prefix), given in zip(_BASELINES, given_keys, strict=True):
        key = given or Key.derived(annotation_key, derived)
        theirs = adata.uns.get(key)
        if given is not None and not isinstance(theirs, dict):
            record(adata, key, kind=label, hint=f"run sct.tl.{tool}.")
        found = record_kind(theirs) or "no sctranscoder record"
        if given is not None and found != kind:
            raise ValueError(
                f"adata.uns[{key!r}] is not a {label} (it holds: {found}): pass the key_added "
                f"of `sct.tl.{tool}`, or None for its default key."
            )
        if isinstance(theirs, dict) and "summary" in theirs:
            _join(table, theirs["summary"], prefix)
    return table


def _join(table: pd.DataFrame, summary: pd.DataFrame, prefix: str) -> None:
    """Add a baseline's summary columns (but ``seconds``) to ``table``, by layer, prefixed."""
    theirs = pd.DataFrame(summary).set_index("layer")
    theirs = theirs.drop(columns=[c for c in theirs if c.endswith("seconds")])
    for column in theirs.columns:
        values = theirs[column].reindex(table["layer"].to_numpy())
        table[prefix + column] = values.to_numpy(dtype=float)
