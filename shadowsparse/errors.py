"""One exception type for bad input: the CLI turns it into a clear message and a non-zero exit."""


class ConfigError(ValueError):
    """Bad user input (model, data, sparsity, artifact mismatch). The message names the problem and the fix."""
