"""What the tests use but pytest must not collect: the shared goodness-of-fit calculation
(distribution.py) and the programs the tests and CI run in their own process: the ahead-of-time
Triton compile (aot_compile_triton.py, run by test_triton_aot.py), the host replay of the CUDA
accumulation (cuda_host_sim.cpp, compiled by test_cuda_host_sim.py) and the memory checkers'
hostile-input driver (memcheck_invalid_inputs.py, run by .ci/memcheck.sh and
benchmarks/device_check.sh). tests/conftest.py keeps pytest out of this folder."""
