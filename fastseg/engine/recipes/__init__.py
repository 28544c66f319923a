"""Multi-stage training procedures that drive the models' documented stage calls: the semi-supervised recipe
(`semi`: UniMatch / S4MIM), GSS's tokenizer fitting and round trip (`gss`), SemPLeS' WeakTr phase 1, runs (a) / (b) /
(c), CAM inference and pseudo masks (`semples`) and the small CLIP's contrastive training (`clip`). Later: PADing
stage 2.
"""
