"""annotate_features keeps the full features x sets tables; weighted nets and decoupler's ULM."""

from __future__ import annotations

import anndata as ad
import decoupler as dc
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sctranscoder as sct
from sctranscoder._genesets import gene_sets as load_gene_sets
from sctranscoder._gsea import prerank_many, prerank_matrices

LAYER_KEY, ANNOTATION = "layer_0", "sct_annotation"


def _toy(seed: int = 3) -> tuple[ad.AnnData, pd.DataFrame]:
    """A hand-made activation record (one layer, 12 features, 300 genes) and a signed net.

    Features 0-3 fire on the activated (+) targets of regulon ``R<j>`` and not on its repressed
    (-) ones; 4-8 fire on random genes; 9 fires on nothing in the background; 10-11 are dead.
    Regulon weights are +1/-1 times a magnitude in [0.5, 2].
    """
    rng = np.random.default_rng(seed)
    n_genes, n_features = 300, 12
    genes = np.array([f"G{i}" for i in range(n_genes)])
    rows = []
    for j in range(8):
        members = rng.choice(n_genes, 24, replace=False)
        sign = np.where(np.arange(24) < 16, 1.0, -1.0)
        for g, s in zip(members, sign, strict=True):
            rows.append((f"R{j}", genes[g], s * rng.uniform(0.5, 2.0)))
    net = pd.DataFrame(rows, columns=["source", "target", "weight"])
    cells = rng.integers(1, 40, size=n_genes).astype(np.int64)
    sums = np.zeros((n_genes, n_features), dtype=np.float32)
    for j in range(9):
        if j < 4:
            up = net[(net["source"] == f"R{j}") & (net["weight"] > 0)]["target"]
            idx = np.array([int(g[1:]) for g in up])
        else:
            idx = rng.choice(n_genes, 30, replace=False)
        sums[idx, j] = (cells[idx] * (1.0 + rng.random(len(idx)))).astype(np.float32)
    counts = (sums > 0).astype(np.int32)
    rate = np.r_[np.full(10, 0.01), np.zeros(n_features - 10)]
    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.obsm["X_sct_L0"] = sp.csr_matrix((3, n_features), dtype=np.float32)
    adata.uns["sct_activations"] = {
        "params": {
            "transcoders_key": "sct",
            "layers": np.array([0]),
            "aggregate": "max",
            "sentence_key": "cell_sentence",
            "live_threshold": -3.0,
            "n_top": 50,
            "genes": True,
            "n_tokens": 100,
            "n_cells": 3,
        },
        "obsm_keys": {LAYER_KEY: "X_sct_L0"},
        "firing_rate": {LAYER_KEY: rate},
        "genes": {
            "names": genes,
            "n_cells": cells,
            "counts": {LAYER_KEY: sp.csr_matrix(counts)},
            "sums": {LAYER_KEY: sp.csr_matrix(sums)},
        },
    }
    return adata, net


@pytest.fixture(scope="module")
def toy():
    adata, net = _toy()
    sct.tl.annotate_features(
        adata, gene_sets=net, method=["ora", "prerank", "ulm"], n_top=20, permutations=200
    )
    return adata, net


def test_ora_tables_agree_with_the_best_terms(annotated_base):
    record = annotated_base.uns[ANNOTATION]
    assert record["params"]["tables"]
    for layer in (0, 2):
        en = sct.get.enrichment(annotated_base, layer)
        table = sct.get.feature_table(annotated_base, layer)
        assert en.uns["enrichment"]["method"] == "ora"
        # the rows are the live features, the columns the tested sets
        assert list(en.obs_names) == list(table.index[table["live"]])
        assert list(en.var_names) == list(record["sets"].index)
        overlap = en.layers["overlap"]
        padj, pvalue = en.layers["padj"], en.layers["pvalue"]
        best = en.obs["ora_term"].to_numpy()
        tested = best != ""
        assert tested.sum() >= 10
        # a feature without a term overlaps no set; every other one's term is the argmin of padj
        assert (overlap[~tested] == 0).all()
        rows = np.flatnonzero(tested)
        cols = en.var_names.get_indexer(best[tested])
        np.testing.assert_array_equal(padj[rows, cols], padj[rows].min(axis=1))
        np.testing.assert_array_equal(padj[rows, cols], en.obs["ora_fdr"].to_numpy()[rows])
        np.testing.assert_array_equal(pvalue[rows, cols], en.obs["ora_pvalue"].to_numpy()[rows])
        np.testing.assert_array_equal(pvalue[rows, cols], pvalue[rows].min(axis=1))
        np.testing.assert_array_equal(en.obs["ora_interpretable"], padj.min(axis=1) < 0.05)
        # untested-by-overlap pairs: p = padj = 1, score 0; the score is -log10(p)
        assert (pvalue[overlap == 0] == 1).all()
        assert (padj[overlap == 0] == 1).all()
        assert (en.X[overlap == 0] == 0).all()
        np.testing.assert_allclose(en.X, -np.log10(pvalue), rtol=1e-6, atol=1e-7)
        assert (en.layers["odds_ratio"] > 0).all()


def test_gsea_tables_agree_with_the_best_terms_and_with_prerank_many(toy):
    adata, _ = toy
    en = sct.get.enrichment(adata, 0, method="prerank")
    assert en.uns["enrichment"] == {
        "annotation_key": ANNOTATION,
        "layer": 0,
        "method": "gsea",
        "score": "nes",
    }
    assert set(en.layers) == {"pvalue", "padj", "es"}
    nes = np.where(en.X > 0, en.X, -np.inf)
    rows = np.flatnonzero(en.obs["gsea_term"].to_numpy() != "")
    assert len(rows) >= 4
    np.testing.assert_array_equal(
        en.var_names[nes[rows].argmax(axis=1)], en.obs["gsea_term"].to_numpy()[rows]
    )
    np.testing.assert_allclose(nes[rows].max(axis=1), en.obs["gsea_nes"].to_numpy()[rows], 1e-6)
    best = en.var_names.get_indexer(en.obs["gsea_term"].to_numpy()[rows])
    np.testing.assert_allclose(
        en.layers["padj"][rows, best], en.obs["gsea_fdr"].to_numpy()[rows], rtol=1e-6
    )
    # the matrices hold prerank_many's numbers, and pick its best sets
    scores = sct.get.gene_activations(adata, 0).X.T.astype(np.float64)[en.obs["feature"]]
    genes = list(sct.get.gene_activations(adata, 0).obs_names)
    sets = load_gene_sets(toy[1], min_size=1, max_size=10**9)
    kw = {"permutations": 50, "seed": 1, "weight": 0.0, "min_size": 5}
    long = prerank_many(scores, genes, sets, **kw)
    wide = prerank_matrices(scores, genes, sets, **kw)
    stats = long.pivot(index="query", columns="term", values="nes").loc[:, wide.terms]
    np.testing.assert_allclose(wide.nes, stats.to_numpy(), rtol=1e-6)
    pd.testing.assert_frame_equal(
        wide.best, prerank_many(scores, genes, sets, report="best", **kw), check_dtype=False
    )


def test_weighted_net_keeps_its_weights_and_ulm_is_decouplers(toy, sct_logs):
    adata, net = toy
    sets = load_gene_sets(net, min_size=1, max_size=10**9)
    for source, target, weight in net.head(30).itertuples(index=False):
        assert sets.weights[source][target] == weight
    record = adata.uns[ANNOTATION]
    assert record["params"]["weighted"]
    en = sct.get.enrichment(adata, 0, method="ulm")
    assert set(en.layers) == {"pvalue", "padj"}
    # decoupler's ULM run directly on the features' per-gene mean activations; L0F9 fires on
    # no gene (a constant profile, which decoupler cannot regress): it scores 0, p = 1
    genes = sct.get.gene_activations(adata, 0)
    data = genes.to_df().T.loc[en.obs_names]
    varied = data.std(axis=1).to_numpy() > 0
    assert list(en.obs_names[~varied]) == ["L0F9"]
    assert (en["L0F9"].X == 0).all()
    assert (en["L0F9"].layers["pvalue"] == 1).all()
    # empty=False: genes no feature fires on stay samples of each regression, as in ours
    t, padj = dc.mt.ulm(data[varied], net, tmin=5, empty=False, verbose=False)
    t = t.loc[en.obs_names[varied], en.var_names].to_numpy()
    np.testing.assert_allclose(en.X[varied], t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        en.layers["padj"][varied],
        padj.loc[en.obs_names[varied], en.var_names],
        rtol=1e-3,
        atol=1e-12,
    )
    # the planted features: their regulon first, with the largest positive t
    best = en.obs["ulm_term"].iloc[:4].tolist()
    assert best == ["R0", "R1", "R2", "R3"]
    assert en.obs["ulm_interpretable"].iloc[:4].all()
    positive = np.where(t > 0, t, -np.inf).max(axis=1)
    np.testing.assert_allclose(en.obs["ulm_score"].to_numpy()[varied], positive, rtol=1e-6)
    # the weights are used: the same sets unweighted score differently
    plain = sct.tl.annotate_features(
        adata,
        gene_sets=net.drop(columns="weight"),
        method="ulm",
        baseline=None,
        copy=True,
        key_added="plain",
    )
    unweighted = sct.get.enrichment(plain, 0, annotation_key="plain").X
    assert not plain.uns["plain"]["params"]["weighted"]
    assert np.abs(unweighted - en.X).max() > 1
    # ORA and GSEA ignore the weights, and say so
    sct.tl.annotate_features(adata, gene_sets=net, baseline=None, copy=True, key_added="o")
    assert "weights are ignored" in sct_logs.text


def test_round_trips_keep_the_tables(toy, tmp_path):
    adata, _ = toy
    adata.write_h5ad(tmp_path / "t.h5ad")
    adata.write_zarr(tmp_path / "t.zarr")
    for back in (ad.read_h5ad(tmp_path / "t.h5ad"), ad.read_zarr(tmp_path / "t.zarr")):
        for method in ("ora", "gsea", "ulm"):
            a = sct.get.enrichment(adata, 0, method=method)
            b = sct.get.enrichment(back, 0, method=method)
            np.testing.assert_array_equal(a.X, b.X)
            assert list(a.obs_names) == list(b.obs_names)
            assert list(a.var_names) == list(b.var_names)
            for name in a.layers:
                np.testing.assert_array_equal(a.layers[name], b.layers[name])
            pd.testing.assert_frame_equal(a.obs, b.obs, check_dtype=False)
        assert sp.issparse(back.uns[ANNOTATION]["tables"][LAYER_KEY]["ora"]["overlap"])
        pd.testing.assert_frame_equal(
            sct.get.feature_table(back, 0), sct.get.feature_table(adata, 0), check_dtype=False
        )


def test_tables_false_keeps_the_same_best_terms_only(toy):
    adata, net = toy
    small = sct.tl.annotate_features(
        adata,
        gene_sets=net,
        method=["ora", "prerank", "ulm"],
        n_top=20,
        permutations=200,
        tables=False,
        copy=True,
    )
    assert "tables" not in small.uns[ANNOTATION]
    assert not small.uns[ANNOTATION]["params"]["tables"]
    pd.testing.assert_frame_equal(
        small.uns[ANNOTATION]["features"][LAYER_KEY], adata.uns[ANNOTATION]["features"][LAYER_KEY]
    )
    with pytest.raises(KeyError, match="tables=True"):
        sct.get.enrichment(small, 0)
    # a list of methods is recorded as one, and runs again from the record
    assert list(adata.uns[ANNOTATION]["params"]["method"]) == ["ora", "prerank", "ulm"]
