"""One module per verb; each function takes the composed config, builds typed settings, calls the library."""


def shows(*keys: str):
    """Name the settings `layerboost <verb> --help` lists with their defaults."""
    def decorator(function):
        function.settings = keys
        return function
    return decorator


def adopts_plan_file(function):
    """Mark a verb whose `plan=<file>` brings its own settings (plan_file.adopt_plan_settings): the CLI puts them
    in the config before the verb runs."""
    function.adopts_plan_file = True
    return function
