"""Helper of ``tl/test_distributed_activations.py``: feature activations of a backed ``.h5ad``.

Run plainly (one process) or under ``torchrun`` (gloo, CPU). Opens ``IN`` backed (``"r"``),
computes ``sct.tl.feature_activations`` and writes, from each rank, ``<out>/rank<r>.json``
(whether its AnnData got the record, and its obs names); rank 0 also writes the results to
``<out>/result.h5ad`` (``adata.write_h5ad``, as a user of a backed file would).

    python tests/_distributed_activations.py IN OUT [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


def main(path: Path, out: Path, batch_size: int) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    import anndata as ad

    import sctranscoder as sct
    from sctranscoder.core.distributed import rank

    adata = ad.read_h5ad(path, backed="r")
    sct.tl.feature_activations(adata, batch_size=batch_size, progress=False)
    r = rank()
    (out / f"rank{r}.json").write_text(
        json.dumps(
            {
                "has_record": "sct_activations" in adata.uns,
                "obsm": sorted(adata.obsm.keys()),
                "backed": adata.isbacked,
            }
        )
    )
    if r == 0:
        adata.write_h5ad(out / "result.h5ad")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    main(a.path, a.out, a.batch_size)
