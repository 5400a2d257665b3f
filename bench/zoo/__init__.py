"""unmask.bench.zoo: the model zoo (registered entries, trained on first use, cached and
hashed), the architectures they use, and the resolver that turns any model name a user gives
(zoo name, ``module:function``, checkpoint, TorchScript, ``robustbench:``) into a model.

The zoo sits above ``attacks``, ``explain`` and ``defenses``: its entry modules import the
defenses they wrap and register themselves when this package is imported, so there is no
plugin list and no import cycle.

* :mod:`.registry` -- ``register_model``, ``load``, the cache, cards and fingerprints;
* :mod:`.archs` -- architectures (``SmallCNN``, ``MLP``, ...) and their registry;
* :mod:`.standard`, :mod:`.defended`, :mod:`.literature`, :mod:`.backdoored`,
  :mod:`.certified` -- the entries;
* :mod:`.resolve` -- ``load_model``, one resolver for every command;
* :mod:`.robustbench` -- RobustBench-style local checkpoint directories.
"""

from . import backdoored, certified, defended, literature, standard  # noqa: F401 - register entries
from .registry import (
    MODELS,
    CacheCorruptionWarning,
    ModelEntry,
    ThreadCountWarning,
    cache_dir,
    card,
    entries,
    fingerprint,
    from_checkpoint,
    get,
    isolated,
    list,
    load,
    load_with_card,
    read_state_dict,
    register_model,
    versions,
    wrap,
)
from .robustbench import load_robustbench

__all__ = ["ModelEntry", "MODELS", "register_model", "list", "entries", "get", "load",
           "load_with_card", "card", "cache_dir", "wrap", "from_checkpoint", "read_state_dict",
           "CacheCorruptionWarning", "ThreadCountWarning", "versions", "isolated",
           "fingerprint", "load_robustbench"]
