"""The errors sct-convert raises: one home, importable by every stage and by the torch-free
serving runtime (this module imports nothing).

Each is a ``ValueError`` (what a wrong argument or a wrong file is in Python), and each message
names the layer, scale, file or field at fault and the fix.
"""
from typing import Optional


class ConversionError(ValueError):
    """A model that cannot be converted; the message names the layer or scale and the fix."""


class FileFormatError(ValueError):
    """A file sct-convert cannot read: corrupt or truncated, not written by it, newer, or with a
    metadata field that is missing, malformed or out of range.

    Attributes:
        path: the file, as given.
        field: the metadata field at fault, or ``None`` when the file as a whole is.
    """

    def __init__(self, message: str, path: Optional[object] = None, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.path, self.field = path, field

    def __reduce__(self):  # pickles (multiprocessing, DataLoader workers) with its attributes
        return (type(self), (str(self), self.path, self.field))


class WeightsMismatchError(ValueError):
    """Weights whose keys or shapes do not match the model they are loaded into."""


class UnsafeCheckpointError(ValueError):
    """A ``.pth`` file that pickles objects other than tensors (loading it could run code)."""
