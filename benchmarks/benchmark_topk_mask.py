"""pytest-benchmark view of sparsekern.bench.cases.topk_mask (the cases are defined there, once)."""
CASE_MODULE = "topk_mask"


def test_topk_mask(benchmark, case_run):
    case_run(benchmark)
