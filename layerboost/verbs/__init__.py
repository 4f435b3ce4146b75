"""One module per verb; each function takes the composed config, builds typed settings, calls the library."""


def shows(*keys: str):
    """Name the settings `layerboost <verb> --help` lists with their defaults."""
    def decorator(function):
        function.settings = keys
        return function
    return decorator
