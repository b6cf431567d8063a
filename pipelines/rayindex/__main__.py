"""`python -m rayindex ...`: the same command line as `rayindex ...`."""

from rayindex.cli import main

main()
