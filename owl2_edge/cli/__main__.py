"""`python -m owl2_edge.cli ...`: the `owl2` command."""

from owl2_edge.cli import main

main()
