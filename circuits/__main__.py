"""`python -m circuits ...` is the same as the `circuits` command."""

from .cli import main

main()
