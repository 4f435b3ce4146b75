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


def one_line_errors(action, verbose: bool, interrupted: str = "interrupted") -> None:
    """Run `action()` as every entry point does: a UserError is one line on stderr and exit status 2 (its
    traceback too when `verbose`), Ctrl-C is `interrupted` on stderr and exit status 130."""
    import sys
    import traceback

    try:
        action()
    except UserError as error:
        if verbose:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
