"""pytest-benchmark view of sparsekern.bench.cases.triton_masked_linear (the cases are defined there, once)."""
CASE_MODULE = "triton_masked_linear"


def test_triton_masked_linear(benchmark, case_run):
    case_run(benchmark)
