"""The one exception type for a user's mistake: the CLI prints it as one line and exits with 2."""


class UserError(Exception):
    """Bad input from the user (a recipe, a path, a name); the message says what is wrong and how to fix it."""
