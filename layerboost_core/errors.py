"""User-facing errors: one clear line, exit status 2 (see DESIGN.md, CLI contract)."""


class UserError(Exception):
    """Bad input from the user: the message names the field, the value and what is allowed."""


def did_you_mean(value: str, allowed) -> str:
    """Suffix for an error message listing what is allowed, with the closest match first when there is one."""
    import difflib

    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"allowed: {', '.join(allowed)}{hint}"
