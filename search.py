"""`python search.py [overrides]` is `layerboost search [overrides]` (see conf/config.yaml; --help lists them)."""
import sys

from layerboost.cli import main

if __name__ == "__main__":
    main(["search", *sys.argv[1:]])
