"""Code that travels into exported model folders and runs there under plain transformers (trust_remote_code).

`modeling_layerboost.py` imports its siblings in the folder (`from .hybrid_cache import ...`): the exporter
copies them from `layerboost_core/inference/` next to it. This package's search path includes that folder, so
`layerboost_core.remote_code.modeling_layerboost` imports here as it will there (the exporter reads its class
table; the inference modules then load a second time, under this package's name, which nothing else uses).
"""
from pathlib import Path

__path__.append(str(Path(__file__).resolve().parent.parent / "inference"))
