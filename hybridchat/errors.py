"""One exception type for mistakes a user can fix (bad config, bad file, wrong device).

Entry points catch it and print its message as one line, without a traceback: the message must
name the key, file or line and say what is allowed.
"""


class UserError(Exception):
    pass


def run_or_exit(fn, *args):
    """fn(*args) for an entry point: a UserError becomes one line `error: ...` on stderr and exit
    code 2, never a traceback."""
    import sys

    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
