"""``quant_cfg`` as ModelOpt 0.47's ordered entry list that also takes the classic dict edits.

The built-in configs hold a :class:`QuantCfgList`: a list of ``{"quantizer_name", "parent_class",
"cfg", "enable"}`` entries (iterate it, ``.append({...})`` to it, as in ModelOpt 0.47) that also
answers ``quant_cfg[pattern] = attributes``, ``quant_cfg[pattern]``, ``in``, ``get``, ``items``,
``update`` and ``del`` by pattern, as the older ``{pattern: attributes}`` dict did. Assigning to a
pattern that has an entry replaces that entry where it stands (so later entries still win over
it, exactly as a dict keeps a key's position); a new pattern is appended (``"default"``, i.e.
``"*"``, goes first).

The classes live in :mod:`quant_core.config.frozen` (one module: frozen configs and entry lists
refer to each other); this name is the same module object.
"""

import sys

from quant_core.config import frozen as _home

sys.modules[__name__] = _home
