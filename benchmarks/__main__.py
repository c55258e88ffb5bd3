"""python -m benchmarks [--device cpu|cuda] [--quick] [--only OP] [--json PATH] [--csv PATH]"""
import sys

from sparsekern.bench.report import main

sys.exit(main(sys.argv[1:]))
