"""Triton kernels of lfm-fast (installed as lfm_fast.kernels); they import only torch and triton."""

import os


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
