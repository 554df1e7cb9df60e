"""Gene sets for enrichment, from one argument.

:func:`gene_sets` turns any of the sources users have at hand into ``{name: [SYMBOL, ...]}``:

- a ``dict`` of name -> genes;
- a GMT file (``name<TAB>description<TAB>gene<TAB>gene...``, optionally ``.gz``);
- a decoupler net (``DataFrame`` with ``source`` and ``target`` columns, and an optional
  ``weight`` column that is kept: :attr:`GeneSets.weights`, used by the methods that take
  weights, such as decoupler's ULM);
- ``"markers:<obs column>"``: top markers per group, computed from the data;
- a named library (``"KEGG_2021_Human"``, ``"GO_Biological_Process_2023"``, ...; or
  ``"omnipath:hallmark"`` etc. for decoupler's OmniPath resources). Libraries shipped with
  sctranscoder (:data:`SHIPPED`: ``"GO_BP_2022"``, human GO Biological Process built offline by
  ``scripts/build_go_gene_sets.py``) are read from the package; others from the cache
  directory, then from the optional offline package ``pyenrichr``, and downloaded (then cached)
  only when ``allow_network=True``: nothing here touches the network unless asked.

Symbols are upper-cased and deduplicated; sets are filtered by size. Restricting sets to the genes
the model could see (the background) is the job of the enrichment functions, which know it.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg

from ._logging import quiet_scanpy
from .core.files import write_text_atomic

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["GeneSetsUnavailableError", "gene_sets"]

#: Gene sets as name -> genes.
GeneSetsLike = Mapping[str, Iterable[str]]
#: Folder of the gene-set libraries shipped with sctranscoder (``<name>.gmt.gz`` and the
#: provenance ``<name>.json``: sources, their dates and licences, the command that made it).
SHIPPED_DIR = Path(__file__).parent / "datasets" / "genesets"
#: Libraries shipped with sctranscoder, read offline by name.
SHIPPED = ("GO_BP_2022",)

#: Prefix of data-derived marker sets: ``"markers:<obs column>"``.
MARKERS_PREFIX = "markers:"
#: Prefix of decoupler's OmniPath resources: ``"omnipath:<name>"`` (network, then cached).
OMNIPATH_PREFIX = "omnipath:"
#: decoupler ``dc.op`` functions that return a ``source``/``target`` net without arguments.
OMNIPATH_RESOURCES = ("hallmark", "collectri", "dorothea", "progeny")
#: Enrichr libraries shipped by ``pyenrichr`` 1.0.2 (offline, optional, CC BY-NC-SA 4.0 licence).
PYENRICHR_LIBRARIES = (
    "ARCHS4_TFs_Coexp",
    "ChEA_2022",
    "DrugMatrix",
    "GO_Biological_Process_2023",
    "KEGG_2021_Human",
    "MGI_Mammalian_Phenotype_Level_4_2021",
    "WikiPathway_2023_Human",
    "dbGaP",
)


class GeneSets(dict):
    """Gene sets ``{name: [SYMBOL, ...]}`` that remember where they came from (``source``: a
    name or path as given, or the type of the object), so that a tool given already loaded sets
    records their origin, not ``"dict"``.

    ``weights``: ``{name: {SYMBOL: weight}}`` for every gene of every set when the source was a
    decoupler net with a ``weight`` column (signed regulons such as CollecTRI's, ``+1``/``-1``,
    or any real weights), else ``None``. Restricting the sets to a background
    (:func:`restrict_sets`) keeps the weights of the genes that remain.
    """

    def __init__(
        self,
        sets: Mapping[str, list[str]],
        source: str,
        *,
        reloadable: bool = False,
        weights: Mapping[str, Mapping[str, float]] | None = None,
    ):
        super().__init__(sets)
        self.source = source
        self.reloadable = reloadable
        self.weights = (
            None
            if weights is None
            else {name: {g: float(weights[name][g]) for g in genes} for name, genes in sets.items()}
        )


def set_weights(sets: Mapping[str, list[str]]) -> dict[str, dict[str, float]] | None:
    """The weights of ``sets`` (:attr:`GeneSets.weights`), or ``None`` for unweighted sets."""
    return getattr(sets, "weights", None)


def ignored_weights(sets: Mapping[str, list[str]]) -> str:
    """What a membership-only method (ORA, GSEA) drops of weighted ``sets``: ``""`` when every
    weight is 1 (or there are none), else a sentence for a warning.
    """
    weights = set_weights(sets)
    if not weights:
        return ""
    values = np.fromiter((w for ws in weights.values() for w in ws.values()), dtype=float)
    if values.size == 0 or np.all(values == 1.0):
        return ""
    negative = int((values < 0).sum())
    other = int((np.abs(values) != 1.0).sum())
    return (
        f"the net's weights are ignored: a target counts as a member of its set whatever its "
        f"weight ({negative} of {values.size} weights are negative, {other} differ from +1/-1); "
        "method='ulm' uses them"
    )


class GeneSetsUnavailableError(ConnectionError, ValueError):
    """A named gene set library is neither cached nor installed, and the network is not allowed.

    A :class:`ConnectionError` (what is missing is a download) and a :class:`ValueError` (the
    argument cannot be resolved offline), so either ``except`` clause catches it.
    """


def gene_sets(
    source: Mapping[str, Iterable[str]] | str | os.PathLike | pd.DataFrame,
    *,
    adata: AnnData | None = None,
    min_size: int = 5,
    max_size: int = 500,
    n_markers: int = 100,
    cache_dir: str | os.PathLike | None = None,
    allow_network: bool = False,
) -> dict[str, list[str]]:
    """Gene sets as ``{name: [SYMBOL, ...]}`` from a dict, GMT file, net, markers or library name.

    Parameters
    ----------
    source
        One of

        - ``dict``: set name -> iterable of gene symbols;
        - path to a GMT file (``str`` ending in ``.gmt``/``.gmt.gz``, any existing file, or a
          :class:`~pathlib.Path`);
        - decoupler net: :class:`~pandas.DataFrame` with ``source`` (set) and ``target`` (gene)
          columns; a ``weight`` column (finite numbers) is kept as the sets' ``weights`` (a
          gene named twice in a set keeps its first weight, with a warning when they differ);
        - ``"markers:<obs column>"``: for each group of ``adata.obs[<obs column>]``, its top
          ``n_markers`` genes by :func:`scanpy.tl.rank_genes_groups` (Wilcoxon, one group vs the
          rest, on ``adata.raw`` when present, else ``adata.X``, which should then be
          log-normalised) with positive log fold change and adjusted p-value < 0.05. Sets are
          named ``"<obs column>:<group>"``. ``adata`` is not modified;
        - a named library: an Enrichr library name (``"KEGG_2021_Human"``,
          ``"GO_Biological_Process_2023"``, ``"CellMarker_2024"``, ...) or
          ``"omnipath:<resource>"`` with ``<resource>`` one of :data:`OMNIPATH_RESOURCES`.
    adata
        Data for ``"markers:..."`` sources.
    min_size, max_size
        Keep sets with ``min_size <= len(set) <= max_size`` genes (after deduplication, before
        any restriction to a background).
    n_markers
        Genes per group for ``"markers:..."`` sources.
    cache_dir
        Where named libraries are cached as ``<name>.gmt``. Default:
        ``$XDG_CACHE_HOME/sctranscoder/genesets`` (``~/.cache/sctranscoder/genesets``).
    allow_network
        Download a named library that is neither cached nor shipped by ``pyenrichr`` (Enrichr via
        :func:`gseapy.get_library`, OmniPath via ``decoupler.op``) and cache it. Off by default:
        without it nothing touches the network.

    Returns
    -------
    ``{set name: [upper-case gene symbols, deduplicated, in first-seen order]}`` (a
    :class:`GeneSets`; with a weighted net, its ``weights`` are ``{set: {symbol: weight}}``).

    Raises
    ------
    TypeError
        ``source`` is none of the above.
    ValueError
        No set has a size within ``[min_size, max_size]``; or a net lacks its columns; or a
        ``"markers:..."`` source lacks ``adata``.
    GeneSetsUnavailableError
        (a ``ConnectionError`` and a ``ValueError``) a named library is not available offline and
        ``allow_network`` is False, or the download failed.

    Examples
    --------
    >>> sets = gene_sets({"T": ["CD3D", "CD3E", "CD2", "IL7R", "LCK"]})
    >>> sets = gene_sets("markers:bulk_labels", adata=adata)  # doctest: +SKIP
    >>> sets = gene_sets("KEGG_2021_Human", allow_network=True)  # doctest: +SKIP
    """
    raw, what = _load(
        source,
        adata=adata,
        n_markers=n_markers,
        cache_dir=cache_dir,
        allow_network=allow_network,
    )
    kept = _filter_sizes(raw, min_size=min_size, max_size=max_size, what=what)
    return GeneSets(
        kept,
        source_name(source),
        reloadable=is_reloadable(source),
        weights=set_weights(raw),
    )


# --- sources ---------------------------------------------------------------------------------


def _load(
    source: object,
    *,
    adata: AnnData | None,
    n_markers: int,
    cache_dir: str | os.PathLike | None,
    allow_network: bool,
) -> tuple[dict[str, list[str]], str]:
    """Unfiltered, cleaned sets from ``source`` and a short description of it for messages."""
    if isinstance(source, GeneSets):
        sets = _from_mapping(source)
        if source.weights is not None:  # already cleaned: the same symbols
            sets = GeneSets(sets, source.source, weights=source.weights)
        return sets, f"the sets from {source.source}"
    if isinstance(source, Mapping):
        return _from_mapping(source), "the dict"
    if isinstance(source, pd.DataFrame):
        return _from_net(source), "the net"
    if isinstance(source, os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"gene set file {str(path)!r} not found")
        return read_gmt(path), f"GMT file {str(path)!r}"
    if isinstance(source, str):
        if source.startswith(MARKERS_PREFIX):
            column = source[len(MARKERS_PREFIX) :]
            return _markers(adata, column, n_markers=n_markers), f"markers of {column!r}"
        lowered = source.lower()
        if lowered.endswith((".gmt", ".gmt.gz")):
            if not Path(source).is_file():
                raise FileNotFoundError(f"gene set file {source!r} not found")
            return read_gmt(source), f"GMT file {source!r}"
        if Path(source).is_file():
            return read_gmt(source), f"GMT file {source!r}"
        return (
            _named_library(source, cache_dir=cache_dir, allow_network=allow_network),
            f"library {source!r}",
        )
    raise TypeError(
        f"gene sets cannot be read from a {type(source).__name__}: pass a dict name -> genes, "
        "a GMT path, a decoupler net DataFrame (source/target), 'markers:<obs column>' or a "
        "library name such as 'KEGG_2021_Human'"
    )


def clean_symbol(gene: object) -> str:
    """How every tool compares gene symbols: stripped and upper-cased."""
    return str(gene).strip().upper()


def clean_genes(genes: Iterable[object]) -> list[str]:
    """Upper-case, stripped, non-empty, deduplicated symbols, in first-seen order."""
    if isinstance(genes, str):
        raise TypeError(
            f"expected an iterable of gene symbols, got the string {genes[:40]!r}: wrap a "
            "single gene in a list"
        )
    out = (clean_symbol(g) for g in genes if g is not None and not _isna(g))
    return list(dict.fromkeys(g for g in out if g))


def _isna(value: object) -> bool:
    return isinstance(value, float) and value != value


def _from_mapping(source: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    return {str(name): clean_genes(genes) for name, genes in source.items()}


def _from_net(net: pd.DataFrame) -> dict[str, list[str]]:
    """The sets of a decoupler net; a :class:`GeneSets` with ``weights`` when it has a
    ``weight`` column.
    """
    missing = [c for c in ("source", "target") if c not in net.columns]
    if missing:
        raise ValueError(
            f"a decoupler net needs 'source' (set) and 'target' (gene) columns; missing "
            f"{missing}, found {list(net.columns)}"
        )
    weighted = "weight" in net.columns
    columns = ["source", "target", "weight"] if weighted else ["source", "target"]
    net = net.loc[net["source"].notna() & net["target"].notna(), columns]
    grouped = net.groupby(net["source"].astype(str), sort=False, observed=True)["target"]
    sets = {name: clean_genes(targets) for name, targets in grouped}
    if not weighted:
        return sets
    return GeneSets(sets, "DataFrame", weights=_net_weights(net))


def _net_weights(net: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{source: {SYMBOL: weight}}`` of a net: the first weight of each (source, target)."""
    weight = pd.to_numeric(net["weight"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(weight).all():
        bad = net.loc[~np.isfinite(weight)].head(3)
        raise ValueError(
            "the net's 'weight' column must hold finite numbers; found "
            f"{bad[['source', 'target', 'weight']].to_dict('records')}: fix or drop those rows "
            "(or drop the column for unweighted sets)"
        )
    long = pd.DataFrame(
        {
            "source": net["source"].astype(str).to_numpy(),
            "target": [clean_symbol(t) for t in net["target"]],
            "weight": weight,
        }
    )
    long = long[long["target"] != ""]
    conflicts = long.groupby(["source", "target"], sort=False)["weight"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):  # as for the genes, the first row of a pair counts
        (source, target), n = conflicts.index[0], int(conflicts.iloc[0])
        logg.warning(
            f"the net gives {len(conflicts)} (source, target) pairs more than one weight, e.g. "
            f"{target!r} in {source!r} ({n} weights): the first row of each pair is used (keep "
            "one row per pair, e.g. net.drop_duplicates(subset=['source', 'target']), to choose)"
        )
    long = long.drop_duplicates(["source", "target"])
    out: dict[str, dict[str, float]] = {}
    for source, target, w in zip(long["source"], long["target"], long["weight"], strict=True):
        out.setdefault(source, {})[target] = float(w)
    return out


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file (``name<TAB>description<TAB>genes...``; ``.gz`` is decompressed).

    Enrichr-style ``GENE,weight`` entries keep the gene; a set named twice gets the union of
    its genes.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    sets: dict[str, list[str]] = {}
    saw_tab = False
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            saw_tab = True
            genes = [re.sub(",.*", "", g) for g in parts[2:]]
            name = parts[0].strip()
            sets[name] = clean_genes([*sets.get(name, []), *genes])
    if not saw_tab:
        raise ValueError(
            f"{str(path)!r} is not a GMT file: expected tab-separated lines "
            "'name<TAB>description<TAB>gene<TAB>gene...'"
        )
    return sets


def write_gmt(
    sets: Mapping[str, Iterable[str]], path: str | os.PathLike, description: str = ""
) -> None:
    """Write ``sets`` as a GMT file, atomically (a reader never sees half a file)."""
    text = "".join("\t".join([name, description, *genes]) + "\n" for name, genes in sets.items())
    write_text_atomic(Path(path), text)


def _markers(adata: AnnData | None, column: str, *, n_markers: int) -> dict[str, list[str]]:
    """Top up-regulated markers per group of ``adata.obs[column]`` (Wilcoxon vs rest)."""
    if adata is None:
        raise ValueError(f"gene sets 'markers:{column}' are computed from the data: pass adata=")
    if column not in adata.obs:
        raise KeyError(
            f"adata.obs[{column!r}] not found (columns: {list(adata.obs.columns)[:20]}); "
            f"'markers:<column>' names the obs column whose groups get marker sets"
        )
    import scanpy as sc
    from anndata import AnnData

    column_values = adata.obs[column]
    labels = column_values.astype(str).astype("category")  # NaN becomes "nan": part of "rest"
    counts = labels.value_counts()
    named = column_values.dropna().astype(str).value_counts()
    # rank_genes_groups needs >= 2 cells per tested group; smaller groups stay in "rest"
    groups = [str(g) for g in named.index if named[g] >= 2]
    if not groups or len(counts) < 2:
        raise ValueError(
            f"adata.obs[{column!r}] needs at least two groups, one with >= 2 cells, for markers"
        )
    # A minimal AnnData of the data we need: the caller's object is never written to, and
    # nothing else (obsm, layers, uns) is copied.
    X, var_names = (
        (adata.raw.X, adata.raw.var_names) if adata.raw is not None else (adata.X, adata.var_names)
    )
    tmp = AnnData(
        X=X,
        obs=pd.DataFrame({"group": labels.to_numpy()}, index=adata.obs_names.astype(str)),
        var=pd.DataFrame(index=var_names.astype(str)),
    )
    tmp.obs["group"] = tmp.obs["group"].astype("category")
    with quiet_scanpy():  # its messages would name our scratch AnnData
        sc.tl.rank_genes_groups(
            tmp,
            "group",
            groups=groups if len(groups) < len(counts) else "all",
            reference="rest",
            method="wilcoxon",
            n_genes=tmp.n_vars,
            use_raw=False,
        )
    table = sc.get.rank_genes_groups_df(tmp, group=None)
    if "group" not in table:  # a single tested group comes back without the column
        table["group"] = groups[0]
    up = table[(table["logfoldchanges"] > 0) & (table["pvals_adj"] < 0.05)]
    top = up.groupby("group", sort=False, observed=True).head(n_markers)
    return {
        f"{column}:{group}": clean_genes(genes["names"])
        for group, genes in top.groupby("group", sort=False, observed=True)
    }


# --- named libraries -------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sctranscoder/genesets``, or ``~/.cache/sctranscoder/genesets``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sctranscoder" / "genesets"


def _cache_file(name: str, cache_dir: str | os.PathLike | None) -> Path:
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', name)}.gmt"


def _pyenrichr_file(name: str) -> Path | None:
    """The library file shipped inside the ``pyenrichr`` package, found without importing it.

    Importing ``pyenrichr`` pulls in numba, statsmodels and python-louvain, and its own
    ``get_library`` downloads whatever is missing; reading its data folder does neither.
    """
    if not re.fullmatch(r"[A-Za-z0-9_+-]+", name):
        return None
    try:
        spec = importlib.util.find_spec("pyenrichr")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / name
        if candidate.is_file():
            return candidate
    return None


def _named_library(
    name: str, *, cache_dir: str | os.PathLike | None, allow_network: bool
) -> dict[str, list[str]]:
    if name in SHIPPED:
        return read_gmt(SHIPPED_DIR / f"{name}.gmt.gz")
    cache = _cache_file(name, cache_dir)
    if cache.is_file():
        return read_gmt(cache)
    tried = [f"the cache file {str(cache)!r} (not there)"]
    if not name.startswith(OMNIPATH_PREFIX):
        shipped = _pyenrichr_file(name)
        if shipped is not None:
            return read_gmt(shipped)
        tried.append(
            "the optional offline package pyenrichr "
            + (
                "(installed, but it does not ship this library)"
                if importlib.util.find_spec("pyenrichr") is not None
                else "(not installed)"
            )
        )
    if not allow_network:
        raise GeneSetsUnavailableError(
            f"gene set library {name!r} is not available offline. Tried: {'; '.join(tried)}. "
            f"The network was not used (allow_network=False). To fix: on a machine with network, "
            f"call gene_sets({name!r}, allow_network=True) once to download and cache it (then "
            f"copy {str(cache)!r} here); or `pip install pyenrichr` (offline Enrichr libraries: "
            f"GO_Biological_Process_2023, KEGG_2021_Human, ...; licence CC BY-NC-SA 4.0); or use a "
            f"library shipped with sctranscoder ({', '.join(SHIPPED)}: human GO Biological "
            "Process, offline); or pass a GMT path, a dict, a decoupler net or "
            "'markers:<obs column>' instead."
        )
    sets = _download(name)
    write_gmt(sets, cache, description=name)
    return read_gmt(cache)


def _download(name: str) -> dict[str, list[str]]:
    """Download a named library (Enrichr via gseapy, OmniPath via decoupler)."""
    if name.startswith(OMNIPATH_PREFIX):
        resource = name[len(OMNIPATH_PREFIX) :]
        if resource not in OMNIPATH_RESOURCES:
            raise ValueError(
                f"unknown OmniPath resource {resource!r}: use one of {list(OMNIPATH_RESOURCES)}"
            )
        import decoupler as dc

        try:
            net = getattr(dc.op, resource)()
        except Exception as err:  # any transport error: say what failed and how to avoid it
            raise GeneSetsUnavailableError(
                f"downloading {name!r} with decoupler.op.{resource}() failed: {err}"
            ) from err
        return _from_net(net)

    import gseapy

    try:
        sets = gseapy.get_library(name, organism="Human", min_size=0, max_size=10**9)
    except ValueError as err:  # gseapy: the name is not an Enrichr library
        raise ValueError(f"{name!r} is not an Enrichr library ({err})") from err
    except Exception as err:
        raise GeneSetsUnavailableError(
            f"downloading Enrichr library {name!r} with gseapy.get_library failed: {err}"
        ) from err
    return _from_mapping(sets)


# --- size filter -----------------------------------------------------------------------------


def _filter_sizes(
    sets: dict[str, list[str]], *, min_size: int, max_size: int, what: str
) -> dict[str, list[str]]:
    if min_size > max_size:
        raise ValueError(f"min_size={min_size} is larger than max_size={max_size}")
    kept = {name: genes for name, genes in sets.items() if min_size <= len(genes) <= max_size}
    if kept and set_weights(sets) is not None:
        kept = GeneSets(kept, "", weights=set_weights(sets))
    if not kept:
        sizes = [len(g) for g in sets.values()]
        detail = (
            f"{len(sizes)} sets with sizes {min(sizes)} to {max(sizes)}" if sizes else "no sets"
        )
        raise ValueError(
            f"no gene set from {what} has between min_size={min_size} and max_size={max_size} "
            f"genes ({detail}); change min_size/max_size or the source"
        )
    return kept


def is_reloadable(source: object) -> bool:
    """Whether :func:`source_name` of ``source`` loads the same sets again (a name or a path)."""
    if isinstance(source, GeneSets):
        return source.reloadable
    return isinstance(source, str | os.PathLike)


def source_name(source: object) -> str:
    """How a gene-set source is recorded in ``uns``: a name or path as given, else its type.

    Only names and paths (``"markers:<col>"``, a library name, a GMT path) can be loaded again
    from the record; a dict or a net is recorded by its type name; loaded :class:`GeneSets` by
    their own source.
    """
    if isinstance(source, GeneSets):
        return source.source
    return os.fspath(source) if isinstance(source, str | os.PathLike) else type(source).__name__


def background_index(background: Iterable[str]) -> pd.Index:
    """The background genes, cleaned (upper-case, deduplicated), as an index; never empty."""
    bg = pd.Index(clean_genes(background))
    if bg.empty:
        raise ValueError("the background is empty: pass the genes the model could have seen")
    return bg


def restrict_sets(
    gene_sets: GeneSetsLike, background: pd.Index, min_size: int = 1, max_size: int | None = None
) -> dict[str, list[str]]:
    """Each set cut to the ``background`` genes (in set order), kept with ``min_size`` to
    ``max_size`` genes there; a ``ValueError`` when none is left. Weighted sets
    (:class:`GeneSets` with ``weights``) stay weighted.
    """
    if not isinstance(gene_sets, Mapping):
        raise TypeError(
            f"gene_sets must be a dict name -> genes, got {type(gene_sets).__name__}: build one "
            "from a GMT path, a decoupler net, 'markers:<obs column>' or a library name with "
            "sctranscoder's gene_sets()"
        )
    in_bg = set(background)
    min_size = max(int(min_size), 1)
    out = {}
    for name, genes in gene_sets.items():
        kept = [g for g in clean_genes(genes) if g in in_bg]
        if min_size <= len(kept) and (max_size is None or len(kept) <= max_size):
            out[str(name)] = kept
    weights = set_weights(gene_sets)
    if out and weights is not None:
        out = GeneSets(
            out,
            getattr(gene_sets, "source", ""),
            reloadable=getattr(gene_sets, "reloadable", False),
            weights=weights,
        )
    if not out:
        limits = f"min_size={min_size}" + (f" and max_size={max_size}" if max_size else "")
        raise ValueError(
            f"No gene set keeps {limits} genes among the {len(background)} background genes: "
            "check that sets and background use the same identifiers (gene symbols) and "
            "organism, or change the size limits."
        )
    return out


def gene_sets_in_background(
    source: object,
    background: Iterable[str],
    *,
    adata: AnnData | None = None,
    min_size: int = 5,
    max_size: int = 500,
    allow_network: bool = False,
) -> dict[str, list[str]]:
    """:func:`gene_sets`, each set cut to the ``background`` genes, then filtered by size.

    For a library shipped with sctranscoder, genes the background names by an outdated symbol
    are matched through the library's alias table (:func:`match_aliases`).

    Raises a ``ValueError`` when no set keeps ``min_size`` to ``max_size`` background genes
    (usually different symbols or organism).
    """
    sets = gene_sets(source, adata=adata, min_size=1, max_size=10**9, allow_network=allow_network)
    background = list(background)
    # a net (DataFrame) has a "source" column, not a library name
    library = source if isinstance(source, str) else getattr(sets, "source", None)
    if library in SHIPPED:
        weights = set_weights(sets)
        sets, renamed = match_aliases(sets, background, library)
        if weights is not None:  # a weighted copy of a shipped library, renamed likewise
            back = {a: s for s, a in renamed.items()}
            sets = GeneSets(
                sets,
                library,
                weights={
                    n: {g: weights[n][back.get(g, g)] for g in genes} for n, genes in sets.items()
                },
            )
        if renamed:
            logg.info(
                f"    {len(renamed)} genes of the data matched to {library} by an outdated symbol "
                f"(e.g. {', '.join(f'{a} for {s}' for s, a in list(renamed.items())[:3])})"
            )
    return restrict_sets(sets, background_index(background), min_size, max_size)


def match_aliases(
    sets: Mapping[str, list[str]], background: Iterable[str], library: str
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``sets`` with each official symbol that the ``background`` lacks replaced by the one
    outdated symbol (alias) of that gene the background has, from the shipped ``library``'s
    alias table (aliases of exactly one gene, never another gene's symbol); and the renames,
    official -> alias. A gene with two such aliases in the background is left as it is.
    """
    table = SHIPPED_DIR / f"{library}.aliases.tsv.gz"
    if not table.is_file():
        return dict(sets), {}
    present = {clean_symbol(g) for g in background}
    found: dict[str, list[str]] = {}
    with gzip.open(table, "rt", encoding="utf-8") as fh:
        for line in fh:
            alias, symbol = line.rstrip("\n").split("\t")
            if alias in present and symbol not in present:
                found.setdefault(symbol, []).append(alias)
    renamed = {s: a[0] for s, a in found.items() if len(a) == 1}
    return {n: [renamed.get(g, g) for g in genes] for n, genes in sets.items()}, renamed
