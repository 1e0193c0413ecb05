"""The fixed names config fields and CLI flags choose from. Torch-free: `lfm-fast --help` builds its parser from
these without importing torch (which alone takes seconds)."""

FIXED_SOLVERS = ("euler", "midpoint", "heun", "rk4", "ab2", "ab3", "abm3", "dpm++2m")
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "adaptive_heun")
SOLVERS = FIXED_SOLVERS + ADAPTIVE_SOLVERS
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 1, "ab3": 1, "abm3": 1, "dpm++2m": 1}
GRIDS = ("uniform", "shifted", "power", "calibrated")
CONDITIONS = ("none", "inpaint", "semantic")  # model.condition: what a model is conditioned on besides labels
ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "math", "xformers", "reference")
NORM_BACKENDS = ("auto", "triton", "compile", "reference")
INFERENCE_DTYPES = ("auto", "fp32", "bf16", "fp16")  # the network's at sampling; auto: bf16 on CUDA, fp32 elsewhere
