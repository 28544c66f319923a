"""Multi-stage training procedures that drive the models' documented stage calls: the semi-supervised recipe
(`semi`: UniMatch / S4MIM) and GSS's tokenizer fitting and round trip (`gss`). Later: PADing stage 2, SemPLeS runs.
"""
