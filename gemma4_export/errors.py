"""Typed errors. Every error the tool raises on bad input derives from Gemma4ExportError, so the CLI can print
one clear line (no traceback unless GEMMA4_EXPORT_DEBUG is set) and exit with the error's code."""


class Gemma4ExportError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class UnknownVariantError(Gemma4ExportError):
    pass


class ConfigError(Gemma4ExportError):
    """A config.json that is missing, unreadable, or not a Gemma 4 config."""


class CheckpointError(Gemma4ExportError):
    """A checkpoint that is missing, pickled, corrupt, truncated, or does not match its config."""


class CheckpointNotFoundError(CheckpointError):
    pass


class QuantError(Gemma4ExportError):
    """An impossible quantization choice: unknown preset or type, an override that matches nothing, a type that
    cannot hold a tensor's rows."""
