"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (model, image, budget, artifact folder, missing tool) with the fix in the message."""
