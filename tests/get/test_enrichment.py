"""sct.get.enrichment: a layer's features x gene sets as an AnnData for scanpy and decoupler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sctranscoder as sct
from sctranscoder._genesets import gene_sets

ANNOTATION = "sct_annotation"


def test_enrichment_anndata_layout(annotated_base):
    record = annotated_base.uns[ANNOTATION]
    en = sct.get.enrichment(annotated_base, 1, method="ora")
    table = sct.get.feature_table(annotated_base, 1)
    live = table.index[table["live"]]
    assert en.shape == (len(live), len(record["sets"]))
    assert list(en.obs_names) == list(live)
    np.testing.assert_array_equal(en.obs["feature"], [int(n.split("F")[1]) for n in live])
    pd.testing.assert_frame_equal(
        en.obs.drop(columns="feature"), record["features"]["layer_1"].loc[live]
    )
    np.testing.assert_array_equal(en.var["size"], record["sets"]["size"])
    assert en.X.dtype == np.float32
    assert set(en.layers) == {"pvalue", "padj", "overlap", "odds_ratio"}
    for name in ("pvalue", "padj"):
        assert ((en.layers[name] > 0) & (en.layers[name] <= 1)).all()
    assert (en.layers["padj"] >= en.layers["pvalue"]).all()
    assert en.uns["enrichment"]["score"] == "-log10(pvalue)"
    # the default method is the one the annotation ran
    np.testing.assert_array_equal(sct.get.enrichment(annotated_base, 1).X, en.X)
    # overlaps are the feature's top genes in the set
    term = en.obs["ora_term"].iloc[0]
    if term:
        top = set(table.loc[en.obs_names[0], "top_genes"].split(";")[:20])
        sets = gene_sets("markers:bulk_labels", adata=annotated_base, min_size=1)
        assert en[0, term].layers["overlap"].item() == len(top & set(sets[term]))


def test_scanpy_tools_read_it(annotated_base):
    en = sct.get.enrichment(annotated_base, 2)
    en.obs["interpretable"] = en.obs["ora_interpretable"].map({True: "yes", False: "no"})
    en.obs["interpretable"] = en.obs["interpretable"].astype("category")
    if en.obs["interpretable"].nunique() < 2:
        pytest.skip("every live feature is on one side of the threshold")
    sc.tl.rank_genes_groups(en, "interpretable", method="t-test", use_raw=False)
    ranked = sc.get.rank_genes_groups_df(en, group="yes")
    assert set(ranked["names"]) == set(en.var_names)
    padj = en.to_df(layer="padj")
    assert padj.shape == en.shape
    assert list(padj.columns) == list(en.var_names)
