"""pytest-benchmark view of sparsekern.bench.cases.prune_grow (the cases are defined there, once)."""
CASE_MODULE = "prune_grow"


def test_prune_grow(benchmark, case_run):
    case_run(benchmark)
