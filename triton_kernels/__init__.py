"""Triton kernels of dynkernels, installed as ``dynkernels.triton_kernels``.

Import only through that name: a top-level ``triton_kernels`` belongs to other
packages. Importing this package imports triton.
"""
