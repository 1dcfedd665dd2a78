"""The one exception type the library raises for bad user input."""


class RnnlmError(Exception):
    """A problem with the user's input (file, option, model) explained in one line.

    The CLI turns it into a one-line error and a non-zero exit; library users catch it.
    """
