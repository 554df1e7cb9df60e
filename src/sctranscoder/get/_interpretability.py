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


def interpretability(
    adata: AnnData,
    *,
    annotation_key: str = Key.derived(Key.activations(Key.transcoders), "annotation"),
    random_model_key: str | None = None,
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

    Returns
    -------
    The annotation's summary (``layer``, ``total_live``, ``ora_*`` and/or ``gsea_*`` columns;
    see :func:`sctranscoder.tl.annotate_features`), joined on ``layer`` with the random model's
    summary columns prefixed ``random_model_`` when there is one.
    """
    ann = record(adata, annotation_key, kind="annotation", hint="run `sct.tl.annotate_features`.")
    if "summary" not in ann:
        raise KeyError(f"adata.uns[{annotation_key!r}] is not an annotation record.")
    table = pd.DataFrame(ann["summary"]).copy()
    key = random_model_key or Key.derived(annotation_key, "random_model")
    random = adata.uns.get(key)
    if random_model_key is not None and not isinstance(random, dict):
        record(adata, key, kind="random-model baseline", hint="run sct.tl.random_model_baseline.")
    kind = record_kind(random) or "no sctranscoder record"
    if random_model_key is not None and kind != "random model baseline":
        raise ValueError(
            f"adata.uns[{key!r}] is not a random-model baseline (it holds: {kind}): pass the "
            "key_added of `sct.tl.random_model_baseline`, or None for its default key."
        )
    if isinstance(random, dict) and "summary" in random:
        theirs = pd.DataFrame(random["summary"]).set_index("layer")
        theirs = theirs.drop(columns=[c for c in theirs if c.endswith("seconds")])
        for column in theirs.columns:
            values = theirs[column].reindex(table["layer"].to_numpy())
            table[RANDOM_MODEL + column] = values.to_numpy(dtype=float)
    return table
