"""The shipped offline GO Biological Process library: what the build script makes, read by name.

``tests/data/go_bp_slice.sqlite`` holds the rows of 13 GO BP terms from Debian's
``r-bioc-org.hs.eg.db`` and ``r-bioc-go.db`` 3.16.0 (every 750th set of the build), written by
``python scripts/build_go_gene_sets.py --root debs --slice tests/data/go_bp_slice.sqlite``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import sqlite3
from pathlib import Path

import scanpy as sc

from sctranscoder._genesets import (
    SHIPPED_DIR,
    gene_sets,
    gene_sets_in_background,
    match_aliases,
    read_gmt,
)

ROOT = Path(__file__).resolve().parents[1]
SLICE = Path(__file__).parent / "data" / "go_bp_slice.sqlite"


def _script():
    spec = importlib.util.spec_from_file_location(
        "build_go", ROOT / "scripts" / "build_go_gene_sets.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_file_is_what_the_script_makes_of_the_same_rows():
    build = _script()
    db = sqlite3.connect(SLICE)
    facts = json.loads((SHIPPED_DIR / "GO_BP_2022.json").read_text())
    from_script = build.go_bp_sets(db, db, min_size=facts["min_size"], max_size=facts["max_size"])
    assert len(from_script) == 13
    shipped = read_gmt(SHIPPED_DIR / "GO_BP_2022.gmt.gz")
    for name, genes in from_script.items():
        assert shipped[name] == genes, name
    # and the whole file is the script's output, byte for byte (recorded at build time)
    raw = gzip.decompress((SHIPPED_DIR / "GO_BP_2022.gmt.gz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == facts["sha256_of_uncompressed_gmt"]
    assert facts["n_sets"] == len(shipped)
    assert facts["sources"]["gene_ontology"]["date"] == "2022-07-01"
    assert "CC BY 4.0" in facts["sources"]["gene_ontology"]["licence"]


def test_sizes_and_names_follow_the_parameters():
    build = _script()
    db = sqlite3.connect(SLICE)
    every = build.go_bp_sets(db, db, min_size=1, max_size=10**9)
    small = build.go_bp_sets(db, db, min_size=1, max_size=20)
    assert set(small) < set(every)
    assert all(len(g) <= 20 for g in small.values())
    assert all(name.endswith(")") and "(GO:" in name for name in every)


def test_go_bp_2022_is_read_offline_by_name_and_covers_the_pbmc_genes():
    sets = gene_sets("GO_BP_2022", min_size=1, max_size=10**9, allow_network=False)
    assert len(sets) == json.loads((SHIPPED_DIR / "GO_BP_2022.json").read_text())["n_sets"]
    assert "T cell activation (GO:0042110)" in sets
    assert {"CD3E", "CD28"} <= set(sets["T cell activation (GO:0042110)"])
    pbmc = sc.datasets.pbmc68k_reduced()
    covered = set(pbmc.raw.var_names.str.upper()) & {g for s in sets.values() for g in s}
    assert len(covered) > 0.8 * pbmc.raw.n_vars


def test_outdated_symbols_of_the_data_are_matched_through_the_alias_table():
    sets = gene_sets("GO_BP_2022", min_size=1, max_size=10**9)
    with_atp5f1b = [n for n, g in sets.items() if "ATP5F1B" in g]
    assert with_atp5f1b
    # pbmc68k_reduced names ATP5F1B by its old symbol ATP5B
    background = list(sc.datasets.pbmc68k_reduced().raw.var_names)
    assert "ATP5B" in background
    assert "ATP5F1B" not in background
    matched, renamed = match_aliases(sets, background, "GO_BP_2022")
    assert renamed["ATP5F1B"] == "ATP5B"
    assert all("ATP5B" in matched[n] and "ATP5F1B" not in matched[n] for n in with_atp5f1b)
    assert len(renamed) == 41  # of the 765 genes, 644 are in a set by symbol, 41 more by alias
    # a background with the official symbol keeps it; nothing is renamed without a match
    _, none = match_aliases(sets, ["ATP5F1B", "ATP5B"], "GO_BP_2022")
    assert "ATP5F1B" not in none
    assert gene_sets_in_background("GO_BP_2022", background, min_size=5, max_size=500)
