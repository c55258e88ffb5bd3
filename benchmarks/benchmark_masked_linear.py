"""pytest-benchmark view of sparsekern.bench.cases.masked_linear (the cases are defined there, once)."""
CASE_MODULE = "masked_linear"


def test_masked_linear(benchmark, case_run):
    case_run(benchmark)
