"""Build the offline human GO Biological Process gene sets shipped with sctranscoder.

The source is Bioconductor's annotation packages as Debian ships them, read with ``sqlite3``
(no R): ``r-bioc-org.hs.eg.db`` (``org.Hs.eg.sqlite``: Entrez Gene symbols, ``go_bp_all`` with
GO BP annotations already propagated to every ancestor term) and ``r-bioc-go.db``
(``GO.sqlite``: term names). Fetch them without installing::

    apt-get download r-bioc-org.hs.eg.db r-bioc-go.db
    for f in r-bioc-*.deb; do dpkg-deb -x "$f" debs; done
    python scripts/build_go_gene_sets.py --root debs

Each set is one GO BP term, named ``"<term name> (GO:nnnnnnn)"`` (Enrichr's style), holding the
official symbols of the genes annotated to it or to any descendant term, with every evidence
code except ``ND`` (no biological data available); sets outside ``[min_size, max_size]`` genes
are left out. Writes the gzipped GMT and a JSON of its provenance (source dates, licences, the
command, the counts) beside it, and ``<name>.aliases.tsv.gz``: the unambiguous aliases (outdated
symbols) of the genes in the sets, by which data that still uses them is matched. GO is
CC BY 4.0; NCBI Gene is in the public domain.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sqlite3
import sys
from pathlib import Path

ORG_DB = "usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"
GO_DB = "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
NAME = "GO_BP_2022"
OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "sctranscoder" / "datasets" / "genesets"


def go_bp_sets(
    org: sqlite3.Connection,
    go: sqlite3.Connection,
    *,
    min_size: int = 5,
    max_size: int = 500,
    exclude_evidence: tuple[str, ...] = ("ND",),
) -> dict[str, list[str]]:
    """GO BP term -> sorted official symbols, from the two databases (see the module docstring).

    Sets are ordered by GO id; a term missing from ``go_term`` (obsolete) is left out.
    """
    names = dict(go.execute("SELECT go_id, term FROM go_term WHERE ontology = 'BP'"))
    marks = ",".join("?" * len(exclude_evidence)) or "''"
    rows = org.execute(
        "SELECT DISTINCT a.go_id, g.symbol FROM go_bp_all a JOIN gene_info g ON a._id = g._id "
        f"WHERE a.evidence NOT IN ({marks})",
        exclude_evidence,
    )
    members: dict[str, set[str]] = {}
    for go_id, symbol in rows:
        if go_id in names:
            members.setdefault(go_id, set()).add(symbol)
    return {
        f"{names[go_id]} ({go_id})": sorted(genes)
        for go_id, genes in sorted(members.items())
        if min_size <= len(genes) <= max_size
    }


def unambiguous_aliases(org: sqlite3.Connection, symbols: set[str]) -> dict[str, str]:
    """Outdated or alternative symbol -> official symbol, for the genes of ``symbols``: only
    aliases of exactly one gene that are no gene's official symbol (upper-cased).
    """
    official = {s.upper() for (s,) in org.execute("SELECT symbol FROM gene_info")}
    genes: dict[str, set[str]] = {}
    rows = org.execute(
        "SELECT a.alias_symbol, g.symbol FROM alias a JOIN gene_info g ON a._id = g._id"
    )
    for alias, symbol in rows:
        genes.setdefault(alias.upper(), set()).add(symbol)
    return {
        alias: next(iter(of))
        for alias, of in sorted(genes.items())
        if len(of) == 1 and alias not in official and next(iter(of)) in symbols
    }


def gmt_text(sets: dict[str, list[str]]) -> str:
    """GMT lines: name, an empty description, the genes; tab-separated."""
    return "".join(f"{name}\t\t" + "\t".join(genes) + "\n" for name, genes in sets.items())


def provenance(org: sqlite3.Connection, go: sqlite3.Connection, **facts) -> dict:
    """Source dates and URLs from the databases' metadata, licences, and ``facts``."""
    meta = dict(org.execute("SELECT name, value FROM metadata"))
    return {
        "name": NAME,
        "organism": meta.get("ORGANISM"),
        "sources": {
            "gene_ontology": {
                "date": meta.get("GOSOURCEDATE"),
                "url": meta.get("GOSOURCEURL"),
                "licence": "CC BY 4.0 (http://geneontology.org/docs/go-citation-policy/)",
            },
            "entrez_gene": {
                "date": meta.get("EGSOURCEDATE"),
                "url": meta.get("EGSOURCEURL"),
                "licence": "public domain (NCBI)",
            },
            "packages": "Debian bookworm r-bioc-org.hs.eg.db 3.16.0-1, r-bioc-go.db 3.16.0-1",
        },
        "go_db_date": dict(go.execute("SELECT name, value FROM metadata")).get("GOSOURCEDATE"),
        **facts,
    }


def write_slice(
    org: sqlite3.Connection, go: sqlite3.Connection, go_ids: list[str], path: Path
) -> None:
    """A small SQLite with the rows of ``go_ids`` from both databases (the tests' fixture): the
    ``go_bp_all``, ``gene_info``, ``go_term`` and ``metadata`` tables those terms need.
    """
    path.unlink(missing_ok=True)
    out = sqlite3.connect(path)
    marks = ",".join("?" * len(go_ids))
    annotations = org.execute(
        f"SELECT _id, go_id, evidence FROM go_bp_all WHERE go_id IN ({marks})", go_ids
    ).fetchall()
    ids = sorted({row[0] for row in annotations})
    genes = org.execute(
        f"SELECT _id, gene_name, symbol FROM gene_info WHERE _id IN ({','.join('?' * len(ids))})",
        ids,
    ).fetchall()
    terms = go.execute(
        f"SELECT go_id, term, ontology FROM go_term WHERE go_id IN ({marks})", go_ids
    ).fetchall()
    out.executescript(
        "CREATE TABLE go_bp_all (_id INTEGER, go_id TEXT, evidence TEXT);"
        "CREATE TABLE gene_info (_id INTEGER, gene_name TEXT, symbol TEXT);"
        "CREATE TABLE go_term (go_id TEXT, term TEXT, ontology TEXT);"
        "CREATE TABLE metadata (name TEXT, value TEXT);"
    )
    out.executemany("INSERT INTO go_bp_all VALUES (?, ?, ?)", annotations)
    out.executemany("INSERT INTO gene_info VALUES (?, ?, ?)", genes)
    out.executemany("INSERT INTO go_term VALUES (?, ?, ?)", terms)
    out.executemany("INSERT INTO metadata VALUES (?, ?)", org.execute("SELECT * FROM metadata"))
    out.commit()
    out.execute("VACUUM")
    out.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="where the .debs were extracted")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--min-size", type=int, default=5)
    parser.add_argument("--max-size", type=int, default=2000)
    parser.add_argument(
        "--slice", type=Path, help="also write the tests' slice of the databases to this file"
    )
    args = parser.parse_args(argv)
    org = sqlite3.connect(f"file:{args.root / ORG_DB}?mode=ro", uri=True)
    go = sqlite3.connect(f"file:{args.root / GO_DB}?mode=ro", uri=True)
    sets = go_bp_sets(org, go, min_size=args.min_size, max_size=args.max_size)
    text = gmt_text(sets).encode()
    args.out.mkdir(parents=True, exist_ok=True)
    gmt = args.out / f"{NAME}.gmt.gz"
    with gzip.GzipFile(gmt, "wb", mtime=0) as fh:  # mtime 0: the same bytes every time
        fh.write(text)
    aliases = unambiguous_aliases(org, {g for genes in sets.values() for g in genes})
    with gzip.GzipFile(args.out / f"{NAME}.aliases.tsv.gz", "wb", mtime=0) as fh:
        fh.write("".join(f"{a}\t{s}\n" for a, s in aliases.items()).encode())
    facts = provenance(
        org,
        go,
        command="python scripts/build_go_gene_sets.py " + " ".join(argv or sys.argv[1:]),
        min_size=args.min_size,
        max_size=args.max_size,
        excluded_evidence=["ND"],
        n_sets=len(sets),
        n_genes=len({g for genes in sets.values() for g in genes}),
        sha256_of_uncompressed_gmt=hashlib.sha256(text).hexdigest(),
        n_aliases=len(aliases),
    )
    (args.out / f"{NAME}.json").write_text(json.dumps(facts, indent=2) + "\n")
    if args.slice is not None:  # every 750th set: small, large, deep and shallow terms
        chosen = [name.rsplit("(", 1)[1].rstrip(")") for name in list(sets)[::750]]
        write_slice(org, go, chosen, args.slice)
    print(f"{gmt}: {len(sets)} sets, {facts['n_genes']} genes, {gmt.stat().st_size} bytes")


if __name__ == "__main__":
    main()
