"""`python search.py [overrides]` is `layerboost search [overrides]` (see conf/config.yaml)."""
import sys

from layerboost_core.cli import main

if __name__ == "__main__":
    main(["search", *sys.argv[1:]])
