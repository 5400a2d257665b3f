"""unmask.bench.perf: developer tools that measure unmask itself.

* :mod:`.harness` -- throughput as a ratio to the model's raw forward+backward (``unmask perf``);
* :mod:`.sweep`, :mod:`.variants` -- batch-size sweeps and step-loop variants;
* :mod:`.compare` -- unmask against torchattacks and the other libraries, in one process;
* :mod:`.explain` -- the cost of the explanation methods;
* :mod:`.masking_benchmark` -- the masking diagnosis on the literature's defenses (docs/masking.md);
* :mod:`.verdict_stability` -- how often a verdict changes with the seed.
"""
