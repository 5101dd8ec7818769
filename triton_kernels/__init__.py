"""Triton kernels of fusedecode, installed as ``fusedecode.triton_kernels``.

Importing this package imports Triton; the rest of fusedecode imports it only when the triton
backend is asked for, so fusedecode works without Triton installed.
"""
