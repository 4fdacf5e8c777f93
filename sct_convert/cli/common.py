"""What every ``sct-convert`` command shares: scale parsing and the one-line error contract."""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Union

import click

if TYPE_CHECKING:
    from ..core.scales import Scale

DEFAULT_SCALES = "224,192,128"


def parse_scales(text: str, option: str = "--scales") -> List[Scale]:
    """``"224,192,128x96"`` -> ``[224, 192, (128, 96)]``; ``ValueError`` naming ``option`` otherwise."""
    from ..core.scales import ScaleSyntaxError, normalize_scales, parse_key, require_largest_first

    scales: List[Scale] = []
    for part in text.split(","):
        try:
            scales.append(parse_key(part))
        except ScaleSyntaxError:
            raise ValueError(
                f"bad scale {part.strip()!r} in {option} {text!r}: use ints or HxW, e.g. "
                + ("224,192,128x96" if option == "--scales" else "128 or 128x96")
            ) from None
    normalize_scales(scales)
    if option == "--scales":
        require_largest_first(scales, option)
    return scales


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def warning_line(message: Union[Warning, str], category: type, filename: str, lineno: int, file: Any = None,
                 line: Optional[str] = None) -> None:
    """``warnings.showwarning`` for the CLI: ``Warning: ...`` on one stderr line, no source path."""
    click.echo(f"Warning: {' '.join(str(message).split())}", err=True)


def clean_errors(fn: Callable) -> Callable:
    """Turn any exception from a command into click's one-line ``Error: ...`` and exit 1.

    Warnings raised meanwhile (the library's or a model's) print as one ``Warning:`` line each.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = warning_line
                return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:  # output piped into `head`: not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(0) from None
        except Exception as e:  # noqa: BLE001 - the CLI contract is one line, no traceback
            raise click.ClickException(one_line(e)) from None

    return wrapper


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def scale_text(s: Scale) -> str:
    from ..core.scales import scale_key

    return scale_key(s)
