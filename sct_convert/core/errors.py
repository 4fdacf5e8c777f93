"""The errors sct-convert raises: one home, so every stage can raise them without importing upward.

Each is a ``ValueError`` (what a wrong argument or a wrong file is in Python), and each message
names the layer, scale, file or field at fault and the fix.
"""


class ConversionError(ValueError):
    """A model that cannot be converted; the message names the layer or scale and the fix."""


class FileFormatError(ValueError):
    """A file sct-convert cannot read: corrupt or truncated, not written by it, or newer."""


class WeightsMismatchError(ValueError):
    """Weights whose keys or shapes do not match the model they are loaded into."""


class UnsafeCheckpointError(ValueError):
    """A ``.pth`` file that pickles objects other than tensors (loading it could run code)."""
