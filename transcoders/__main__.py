"""`python -m transcoders ...` is the same as the `transcoders` command."""

from .cli import main

main()
