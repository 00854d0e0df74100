"""Run a script's main() in-process as the tests do: its exit code."""


def exit_code(main, argv):
    """main(argv)'s SystemExit code, 0 when it returns normally (an exception propagates to the test)."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0
