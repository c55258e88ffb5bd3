"""Benchmark cases, one module per topic; each defines `cases(device, quick) -> list[Case]`."""
