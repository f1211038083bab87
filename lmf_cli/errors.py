"""Errors users see as one clear line (the CLI prints `str(error)`, never a traceback).

A message that names an option spells it with `option_name(field)`: the Python name (`max_pixels`)
for the API, the flag (`--max-pixels`) once the command line has registered its flags in
OPTION_NAMES. So no layer below the command line knows a flag, and a renamed flag is one edit.
"""

OPTION_NAMES: dict[str, str] = {}  # option field -> how the front end in this process spells it


def option_name(field: str) -> str:
    return OPTION_NAMES.get(field, field)


class LmfError(Exception):
    """Base class for every error lmf reports to a user."""


class CheckpointError(LmfError):
    """A weights file that cannot be used: missing, corrupt, truncated or of another kind."""


class UnsupportedModelError(CheckpointError):
    """A well-formed checkpoint of an architecture lmf does not implement."""


class InputError(LmfError):
    """Bad input: an unreadable image, an impossible size, a wrong argument."""


class OptionError(InputError):
    """A value an option refuses; `option` is its field, named in the message as the front end spells it."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        self.option, self.value, self.reason = option, value, reason
        super().__init__(f"{option_name(option)} {value}: {reason}")

    def __reduce__(self) -> tuple:  # pickled as it was raised (Ray sends errors back to the driver)
        return type(self), (self.option, self.value, self.reason)
