"""The metrics: what a pair metric reads (:mod:`~trajscope.metrics.pair`), the registry that
built-in and plugin metrics register in (:mod:`~trajscope.metrics.registry`), and the built-in
metrics themselves (:mod:`~trajscope.metrics.builtins`)."""
