"""One exception type for mistakes a user can fix (bad config, bad file, wrong device).

Entry points catch it and print its message as one line, without a traceback: the message must
name the key, file or line and say what is allowed.
"""


class UserError(Exception):
    pass


def undecodable(text: str) -> str | None:
    """Where `text` holds bytes that are not UTF-8 ("byte 0xe9 at character 4"), else None. Python
    keeps such bytes of argv (and of stdin, decoded with surrogateescape) as lone surrogates
    U+DC80..U+DCFF, which the tokenizers refuse with a TypeError."""
    for i, ch in enumerate(text, 1):
        if "\udc80" <= ch <= "\udcff":
            return f"byte 0x{ord(ch) - 0xdc00:02x} at character {i}"
    return None


def run_hydra_app(main, argv: list[str] | None = None) -> None:
    """Call a @hydra.main function as a command: a command line that does not compose (a key that
    does not exist, a value of the wrong type, an unknown group option, bad override syntax), or
    holds bytes that are not UTF-8, ends like every other user error, one line and exit code 2,
    instead of Hydra's report of several lines and exit code 1. argv: the arguments (sys.argv's)."""
    import os
    import sys

    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    for arg in sys.argv[1:] if argv is None else argv:
        if where := undecodable(arg):
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            print(f"error: the argument {shown[:80]}{'...' if len(shown) > 80 else ''} is not UTF-8 text ({where}); "
                  f"give text in UTF-8", file=sys.stderr)
            sys.exit(2)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises instead of printing and exiting
    try:
        main()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
        # Hydra's message with the options it lists (not its search path), then its cause's first
        # line ("Key 'x' not in 'Config'", the conversion that failed), on one line.
        message = str(e).split("Config search path:")[0]
        parts = [" ".join(line.strip() for line in message.splitlines() if line.strip())]
        if e.__cause__ is not None:
            parts.append(str(e.__cause__).strip().splitlines()[0])
        print("error: " + "; ".join(parts), file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        if not _raised_by_hydras_flag_checks(e):
            raise
        # -m with --cfg ("--cfg job" of a sweep), --resolve without --cfg: Hydra's traceback before.
        print(f"error: {e} (--cfg and --info show one run's config: leave out -m/--multirun and give each swept "
              f"key one value)", file=sys.stderr)
        sys.exit(2)


def _raised_by_hydras_flag_checks(e: BaseException) -> bool:
    """Whether Hydra itself raised e while checking its command-line flags, before the app ran."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and (tb.tb_frame.f_globals.get("__name__"), tb.tb_frame.f_code.co_name) == (
        "hydra._internal.utils", "_run_hydra")


def run_or_exit(fn, *args):
    """fn(*args) for an entry point: a UserError becomes one line `error: ...` on stderr and exit
    code 2, never a traceback."""
    import sys

    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
