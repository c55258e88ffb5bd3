"""python -m benchmarks [--device cpu|cuda] [--quick] [--only OP] [--json PATH] [--csv PATH]
[--threads N] [--budget SECONDS]: times every case of sparsekern.bench.cases and prints one table."""
import sys

from sparsekern.bench.report import main

sys.exit(main(sys.argv[1:]))
