"""The continual-tuning runner behind the ``hpa-cvit`` command (see :mod:`hpa_kernels.cvit.cli`).

Modules: ``cli`` (arguments, validation, outputs), ``experiment`` (alignment, methods, training,
evaluation), ``data`` (JSON Lines loading and checks), ``prompts`` (tasks as instructions, the
alignment refusals), ``model`` (loading, chat rendering, batches, generation), ``judge``
(refused / complied / non-answer), ``metrics`` (accuracy, AP, BWT), ``tables``, ``plots``,
``resume`` (checkpoints and atomic writes).
"""
