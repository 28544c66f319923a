"""Kernel benchmark cases, one module per op family (``vq``, ``class_attention``, ``classwise``): each registers its
cases with `fastseg.bench.core.register_kernel_cases` on import; `fastseg.bench.core.kernel_cases` imports them all.
"""
