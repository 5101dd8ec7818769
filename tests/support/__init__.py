"""What the tests use but pytest must not collect: shared inputs and calculations (the hostile
logit rows of adversarial_rows.py, the powered goodness-of-fit tests of distribution.py) and the
programs the tests and CI run in a process of their own: the ahead-of-time Triton compile
(aot_compile_triton.py, run by test_triton_aot.py), the host replay of the CUDA accumulation
(cuda_host_sim.cpp, compiled by test_cuda_host_sim.py) and the memory checkers' hostile-input
driver (memcheck_invalid_inputs.py, run by .ci/memcheck.sh and benchmarks/device_check.sh).
tests/conftest.py keeps pytest out of this folder."""
