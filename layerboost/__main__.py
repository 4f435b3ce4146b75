"""`python -m layerboost <verb> ...` is `layerboost <verb> ...`."""
from .cli import main

main()
