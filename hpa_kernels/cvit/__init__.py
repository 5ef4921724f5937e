"""The continual-tuning runner behind the ``hpa-cvit`` command (see :mod:`hpa_kernels.cvit.run`).

Modules: ``data`` (JSON Lines loading and checks), ``models`` (MiniLM encoder, refusal and task
heads), ``metrics`` (AP, BWT, ASR, over-refusal), ``plots`` (the PNG), ``run`` (the CLI).
"""
