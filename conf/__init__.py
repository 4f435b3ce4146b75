"""The Hydra config of every `layerboost` verb (config.yaml and its groups). A package only so that it ships
inside the wheel as `layerboost.conf` (pyproject maps this folder there); it holds no code."""
