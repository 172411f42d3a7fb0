"""Error types and exit codes shared by the CLI and the stage programs.

A stage program exits with EXIT_CONFIG_ERROR when retrying cannot help (bad recipe, bad data, missing
model); the Kubernetes chart's podFailurePolicy fails the Job at once on that code. Any other non-zero
exit is treated as transient and may be retried.
"""

EXIT_CONFIG_ERROR = 78  # sysexits.h EX_CONFIG
EXIT_FAILURE = 1


class TunectlError(Exception):
    """A problem the user can fix; its message is one line that says what to do."""


class ConfigError(TunectlError):
    """Bad recipe, data or model reference: retrying the same input cannot succeed."""


class ArtifactError(TunectlError):
    """A stage's inputs are missing, incomplete or fail their checksums."""
