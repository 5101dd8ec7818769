"""Lets vLLM's CPU build run Model Runner V2 on the Triton interpreter (tests only).

vLLM's CPU build enables Triton only when Triton has a "cpu" backend (triton-cpu); Model Runner V2
needs Triton for its own kernels. With ``TRITON_INTERPRET=1`` every Triton kernel runs in Triton's
interpreter on CPU tensors, so this registers the interpreter's (inactive) NVIDIA backend under the
name "cpu" before vLLM looks. Python imports ``sitecustomize`` at start-up in every process that has
this folder on ``PYTHONPATH`` (vLLM's engine and worker processes included); it does nothing unless
``FUSEDECODE_VLLM_TRITON_INTERPRETER=1`` and ``TRITON_INTERPRET=1`` are both set.
"""

import os

if os.environ.get("FUSEDECODE_VLLM_TRITON_INTERPRETER") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
    import triton.backends

    triton.backends.backends.setdefault("cpu", triton.backends.backends["nvidia"])
