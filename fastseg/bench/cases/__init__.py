"""Kernel benchmark cases, one module per op family (``vq``, ``class_attention``, ``classwise``) or fused layer
(``mask2former_layer``); ``semples`` holds SemPLeS' two CAM-path ops, registered as the families
``attention_fusion`` and ``cam_masked_pairs``. Each registers its cases with
`fastseg.bench.core.register_kernel_cases` on import; `fastseg.bench.core.kernel_cases` imports them all.
"""
