"""``python -m sct_convert.cli``: the same as the ``sct-convert`` console script."""
from .commands import main

main()
