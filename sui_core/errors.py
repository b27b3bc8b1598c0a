"""User-facing errors: one line that says what is wrong and where."""


class SuiError(Exception):
    """A problem with the user's params, files or data. Stages print it on one line and exit 1."""


class ParamError(SuiError):
    """A param is missing, of the wrong type, or out of range. `key` is `section.name` (the pipeline
    prefixes the params file it read), or the params file itself."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(SuiError):
    """An input file or array is missing, malformed, or holds invalid values."""


class ArtifactError(SuiError):
    """An artifact written by an earlier stage is missing, corrupted or does not match its manifest."""


class DiskFullError(SuiError):
    """Writing an output ran out of disk space (ENOSPC) or quota (EDQUOT); the partial output is removed."""


class TrackingError(SuiError):
    """The MLflow tracking store or server does not answer or refuses a write (SUI_TRACKING=off skips it)."""
