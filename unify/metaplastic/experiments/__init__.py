"""Experiments users run: memory capacity without training (``capacity``), multi-query associative recall
(``mqar``, data in ``mqar_data``), and their plots (``plotting``). Each CLI module exposes
``add_arguments(parser)`` and ``run(args) -> int`` (``metaplastic capacity``, ``metaplastic mqar``)."""
