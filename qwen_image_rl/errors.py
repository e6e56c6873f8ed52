"""Errors shared across the package (a leaf module: it imports nothing of ours)."""


class CheckpointError(ValueError, RuntimeError):
  """A checkpoint or model file cannot be written, read or matched to the model; the message
  names the path or the keys. A ValueError for bad files, a RuntimeError for failed saves and
  restores: callers may catch either."""
