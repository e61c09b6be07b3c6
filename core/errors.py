"""The one error type for bad input; only `studies/*.main()` turns it into a message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it, on one line."""
