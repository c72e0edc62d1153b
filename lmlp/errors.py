"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class LmlpError(Exception):
    """Bad input or state that the user can fix; the message names the file, key or structure."""


class DataError(LmlpError):
    """A structure file or structure is invalid."""


class ConfigError(LmlpError):
    """A configuration file is invalid."""


class LabelError(LmlpError):
    """A reference calculation could not be set up."""
