"""`python -m sparsekern.cli`: the same as the `sparsekern` command."""
from .main import main

if __name__ == "__main__":  # not in the worker processes of compare and reproduce
    main()
