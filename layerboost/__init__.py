"""LayerBoost, the application: the `layerboost` CLI and one module per verb. The only code that reads the
Hydra config (conf/) and turns it into the typed settings of the libraries below it:
layerboost_core (library) -> layerboost_surrogates -> layerboost_search -> layerboost (this package)."""

__all__: list[str] = []  # an application, not a library: use `layerboost <verb>` or the packages below
