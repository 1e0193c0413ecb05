import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU through Triton's interpreter; this must be set before
# triton.jit runs. With a GPU they run for real (and the `gpu` tests check bf16 there).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402,F401 (a hard dependency: a broken import fails the kernel suite, never skips it)


def low_precision_tolerance(out_low, out_ref, floor):
    """flash-attention's rule: the kernel may err at most twice as much as PyTorch's own low-precision
    computation does (against the same fp32 reference), plus a small floor."""
    return 2 * (out_low.float() - out_ref.float()).abs().max().item() + floor
