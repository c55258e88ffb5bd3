"""`autotune`: triton.autotune that keeps only the first config under the interpreter.

Under TRITON_INTERPRET=1 an autotuner with two or more configs fails at launch ("0 active
drivers"), and timing configs there would mean nothing anyway, so the first config of every list
is the one the interpreter runs. Like TRITON_INTERPRET itself, this is read when a kernel decorates.
"""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key, **kwargs)
