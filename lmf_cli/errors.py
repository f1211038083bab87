"""Errors users see as one clear line (the CLI prints `str(error)`, never a traceback)."""


class LmfError(Exception):
    """Base class for every error lmf reports to a user."""


class CheckpointError(LmfError):
    """A weights file that cannot be used: missing, corrupt, truncated or of another kind."""


class UnsupportedModelError(CheckpointError):
    """A well-formed checkpoint of an architecture lmf does not implement."""


class InputError(LmfError):
    """Bad input: an unreadable image, an impossible size, a wrong argument."""
