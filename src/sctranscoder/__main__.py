"""``python -m sctranscoder`` and ``torchrun -m sctranscoder train ...``: the command line."""

from sctranscoder.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
