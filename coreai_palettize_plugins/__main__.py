"""``python -m coreai_palettize_plugins finetune <recipe> [key=value ...]`` (see ``cli.py``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
