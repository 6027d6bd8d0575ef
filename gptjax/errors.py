"""The one exception type users see: bad input, reported as a single line."""


class GptjaxError(ValueError):
    """A problem with the user's input or files; the CLI prints it and exits with 2."""
