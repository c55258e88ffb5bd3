"""Floor 4, the command line: `sparsekern train|compare|reproduce|bench`, its training loop, recipes, embedded
data and models, the store of finished runs. Nothing below imports from here."""
from .main import main

__all__ = ["main"]
