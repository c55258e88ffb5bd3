"""`autotune`: triton.autotune, except that the interpreter runs the first config without an autotuner.

Under TRITON_INTERPRET=1 an autotuner with two or more configs fails at launch ("0 active drivers"),
and before Triton 3.3 building one asks for a GPU driver even with one config; timing configs there
would mean nothing anyway. So the interpreter runs the first config of every list, its values set as
constants (triton.heuristics). Like TRITON_INTERPRET itself, this is read when a kernel decorates.
"""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune(configs: list[triton.Config], key: list[str]):
    if not interpreting():
        return triton.autotune(configs=configs, key=key)
    return triton.heuristics({name: (lambda args, value=value: value) for name, value in configs[0].kwargs.items()})
