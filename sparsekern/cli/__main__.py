"""`python -m sparsekern.cli`: the same as the `sparsekern` command."""
from .main import main

main()
