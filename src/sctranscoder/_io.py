"""Transcoders in files: a directory of safetensors with a manifest, linked to or copied into an
AnnData.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scanpy import logging as logg

from ._constants import Key
from ._records import (
    EMBED_LIMIT_BYTES,
    check_fingerprint,
    check_key,
    transcoder_record,
    transcoder_set,
    write_link,
    write_transcoders,
)
from ._validate import check_bool, check_path, model_or_default
from .core.transcoder_set import TranscoderSet, read_info

if TYPE_CHECKING:
    import os

    from anndata import AnnData

    from .core.model import C2SModel


def save_transcoders(
    adata: AnnData,
    path: str | os.PathLike,
    *,
    key: str = Key.transcoders,
    link: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the transcoders of ``adata.uns[key]`` to a directory.

    The directory holds ``layer_<i>.safetensors``, a ``config.json`` with the base model's
    identity (name, fingerprint), the training config and run, and the quality metrics, and a
    ``manifest.json`` with every file's size and sha256 (see
    :class:`~sctranscoder.core.transcoder_set.TranscoderSet`). It is written to a temporary
    sibling and renamed into place, so an interrupted save leaves nothing half-written.

    Parameters
    ----------
    adata
        Annotated data with transcoders.
    path
        The directory (must not exist unless ``overwrite``).
    key
        ``adata.uns`` key of the transcoders.
    link
        Then keep only a link to the directory in ``adata.uns[key]`` (path and checksum), and
        drop the weights from it: the ``.h5ad`` stays small, and the directory must travel with
        it.
    overwrite
        Replace an existing transcoder directory at ``path``.

    Returns
    -------
    The directory.
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise TypeError(
            "save_transcoders(adata, path): pass the AnnData with the transcoders first, then "
            f"the directory to write (got {type(adata).__name__} and {type(path).__name__})."
        )
    path = check_path(path)
    link, overwrite = check_bool(link, "link"), check_bool(overwrite, "overwrite")
    rec = transcoder_record(adata, key)
    tset = transcoder_set(adata, key)
    if "weights" in rec and Path(str(rec["weights"]["path"])).resolve() == path.resolve():
        raise ValueError(f"adata.uns[{key!r}] is already linked to {path}.")
    tset.save(path, overwrite=overwrite)
    if link:
        write_transcoders(  # the same weights: results made with them stay valid
            adata,
            key,
            tset,
            params=dict(rec["params"]),
            weights_dir=path,
            weights_id=rec.get("weights_id"),
        )
    logg.info(
        f"saved {len(tset)} transcoders to {path}",
        deep=f"adata.uns[{key!r}] now links to it" if link else None,
    )
    return path


def load_transcoders(
    path: str | os.PathLike,
    adata: AnnData,
    *,
    model: C2SModel | str | None = None,
    link: bool | None = None,
    key_added: str = Key.transcoders,
) -> None:
    """Attach the transcoders of a directory (:func:`save_transcoders`) to ``adata``.

    To get them without an AnnData, use :meth:`TranscoderSet.load
    <sctranscoder.core.transcoder_set.TranscoderSet.load>`.

    Parameters
    ----------
    path
        The directory. Its manifest is checked (every file present, with its size and sha256).
    adata
        Where to write the record.
    model
        If given (a :class:`~sctranscoder.core.model.C2SModel`, a model directory or a hub id),
        its fingerprint must match the one recorded with the transcoders.
    link
        ``True``: keep only a link (path and checksum) in ``adata.uns``; ``False``: copy the
        weights into ``adata.uns`` (one self-contained ``.h5ad``). Default: link when the
        weights exceed 1 GiB.
    key_added
        ``adata.uns`` key to write.

    Returns
    -------
    ``None``. Sets ``adata.uns[key_added]`` with ``params``, ``model``, ``metrics`` and either
    ``transcoders`` (the weights) or ``weights`` (the link): see
    :func:`sctranscoder.tl.train_transcoders`.
    """
    from anndata import AnnData

    if isinstance(path, AnnData) or not isinstance(adata, AnnData):
        raise TypeError(
            "load_transcoders(path, adata): pass the directory first, then the AnnData to "
            f"attach the transcoders to (got {type(path).__name__} and {type(adata).__name__})."
        )
    path = check_path(path)
    link = check_bool(link, "link", none=True)
    check_key(key_added, adata=adata, kind="transcoders")
    info = read_info(path, verify=not link)  # a link is checked when its weights are first read
    if "fingerprint" not in info.model:
        raise ValueError(f"{path} records no base model; it was not written by sctranscoder.")
    if model is not None:
        check_fingerprint(info.model, model_or_default(model))
    if link is None:
        link = info.n_bytes > EMBED_LIMIT_BYTES
    params = dict(info.run)
    if info.config is not None:
        params["config"] = info.config.to_dict()
    if link:  # no weight is read
        write_link(
            adata,
            key_added,
            path,
            model=info.model,
            metrics=info.metrics,
            params=params,
            n_bytes=info.n_bytes,
        )
    else:
        write_transcoders(adata, key_added, TranscoderSet.load(path), params=params)
    logg.info(
        f"loaded {len(info.layers)} transcoders from {path}",
        deep=f"added\n    {key_added!r}, {'a link to' if link else 'the weights of'} the "
        "transcoders (adata.uns)",
    )
