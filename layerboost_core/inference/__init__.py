"""What a deployed hybrid runs: the attention modules of every option, their kernels and the hybrid cache.

Portable by construction: each file imports only torch, transformers, the standard library and its siblings
here (single-dot relative imports, never this `__init__`), because exported model folders carry these files
flat, next to `remote_code/modeling_layerboost.py`, and plain transformers runs them without LayerBoost
installed (tests/unit/test_layers.py checks it). The project imports the same files, so the
code a folder ships is the code that was measured. Project-facing pieces (option registration, settings
validation, plans) stay in `attention/` and `cache.py`.
"""
