"""One module per op family: validate -> plan -> launch, forward and backward.

Importing this package imports every module in it; each declares its ops in the op
registry (cuconv/_registry.py) and its algorithms in an algorithm table
(cuconv/ops/_algorithms.py). A new op family is a new module here, nothing else.
The functions are public as cuconv.OP; cuconv.ops.NAME is always the module.
"""

import importlib
import pkgutil

MODULES = tuple(importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
                if not info.name.startswith("_"))
