"""The one exception type for problems a user can fix (bad config, data or model)."""


class UserError(Exception):
    """A problem in the user's input, described in one self-contained message.

    Raised for a bad config key or value, a missing or malformed data file, an
    unknown model, and similar. Entry points print the message alone (no
    traceback) and exit nonzero; the ServerApp logs it and fails the run.
    """
