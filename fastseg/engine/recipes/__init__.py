"""Multi-stage training procedures that drive the models' documented stage calls: the semi-supervised recipe
(`semi`: UniMatch / S4MIM), GSS's tokenizer fitting and round trip (`gss`), SemPLeS' WeakTr phase 1, runs (a) / (b) /
(c), CAM inference and pseudo masks (`semples`), the small CLIP's contrastive training (`clip`) and PADing's
seen-only stage 1, stage 2 (two optimiser steps per iteration) and zero-shot evaluation (`pading`).
"""
