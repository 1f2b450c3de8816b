"""User-facing errors: each prints as one line, with no traceback, and maps to an exit code."""


class PipelineError(Exception):
    """A failure the user can act on; the message is the whole story."""

    exit_code = 1


class ConfigError(PipelineError):
    """The configuration (file, key, value or model it names) is invalid; nothing was written."""

    exit_code = 2


class StageUnavailable(PipelineError):
    """A stage needs something this machine lacks (TensorRT, a GPU, an extra)."""

    exit_code = 3


class ThresholdFailed(PipelineError):
    """A validation threshold from the config was not met."""

    exit_code = 4
