"""fastseg.layers: generic building blocks, no method-specific ones (those live in their model file).

``blocks`` (the one conv-norm-act, channel LayerNorm), ``swin`` (window-attention blocks), ``mit`` (SegFormer's MiT
blocks), and the modules over the fused ops: ``vq`` (vector quantiser, palette inverse, argmax token head),
``class_attention`` (Mask2Former's masked cross-attention), ``classwise`` (class-wise masking and losses).
"""
