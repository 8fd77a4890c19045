"""Triton kernels for GLA (chapters 6-7), installed as glalearn.kernels. Public entry point: glalearn.flash_gla."""
