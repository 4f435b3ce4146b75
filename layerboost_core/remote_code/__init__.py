"""Code that travels into exported model folders and runs there under plain transformers (trust_remote_code).

Not imported by the project: `modeling_layerboost.py` imports its sibling `linear_kernels.py`, which the
exporter copies from `layerboost_core/attention/` next to it in each folder (one copy of the math).
"""
