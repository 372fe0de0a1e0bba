"""Helpers shared by the tests: import them as ``support.<module>`` from any test folder.

pytest puts ``tests/`` on ``sys.path`` (``pythonpath = ["tests"]`` in pyproject.toml), so the
objective factories here are importable *by name* too, as the analyzer imports an objective
(``"support.problems:make_mlp"``), in pytest's own process and in the worker processes it starts.
A test that starts a child interpreter itself puts ``tests/`` on the child's ``PYTHONPATH``.

* :mod:`support.problems`: small problems with objective factories and training loops: the
  stochastic float64 quadratic (closed-form answers), a deterministic MLP classifier on synthetic
  data, softmax regression on the digits.
* :mod:`support.slow_objective`: the MLP with a deliberately slow loss, so that a test can stop an
  analysis mid-way.
* :mod:`support.replay_problems`: a CNN whose replay is hard (train-mode BatchNorm, three dropouts).
* :mod:`support.recorder_objectives`: the recorder tests' tiny MLP, index minibatches, an SGD loop,
  the Hugging Face model and dataset, and the autouse fixture that runs torch single-threaded.
* :mod:`support.gpu_style`: training programs written the way GPU training is (bf16 autocast,
  channels_last, torch.compile, the Hugging Face Trainer, Lightning, accelerate, fp16 with a
  GradScaler) on the CPU, and their objectives.
* :mod:`support.recording`: the plain recorded training loop (``zero_grad``, ``backward``,
  ``rec.batch``, ``step``), for tests whose loop has nothing special.
* :mod:`support.rundirs`: run directories for the reliability tests: a complete quadratic run,
  raw snapshot and manifest surgery, directory fingerprints, the CLI run in-process, ``no_hang``.
* :mod:`support.sharded`: a recorded run rewritten by hand as an FSDP recording writes it (format
  version 3: each snapshot in parts, by offset or flat slices), for the reader's reassembly.
* :mod:`support.float64_reference`: a slow, independent float64 re-computation of every metric
  (not the analyzer's reference point x*, which is :mod:`trajscope.probe.reference_point`).
"""
