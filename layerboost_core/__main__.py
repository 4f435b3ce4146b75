"""`python -m layerboost_core <verb> [overrides]` is `layerboost <verb> [overrides]`."""
from .cli import main

main()
