"""Floor 4, the command line: `sparsekern train|compare|bench`, its training loop, recipes, embedded data
and models. Nothing below imports from here."""
from .main import main

__all__ = ["main"]
