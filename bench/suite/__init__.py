"""unmask.bench.suite: a benchmark suite from TOML to stored results.

* :mod:`.spec` -- the suite file: parsed and validated into frozen dataclasses (``Suite``);
* :mod:`.runner` -- runs a suite: for each model and threat, the masking diagnosis, the
  attack ensemble, the follow-ups, the certified bound and the explanations, one cell at a
  time, resumable, sharded over ``torchrun`` ranks;
* :mod:`.store` -- the SQLite results store (one transaction per cell).
"""
