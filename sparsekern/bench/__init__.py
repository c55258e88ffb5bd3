"""sparsekern's benchmarks: cases in `sparsekern.bench.cases`, the engine in `core`, the table in `report`.

Run them with `python -m benchmarks` from the repository root, or `sparsekern.bench.report.main(argv)`.
"""
