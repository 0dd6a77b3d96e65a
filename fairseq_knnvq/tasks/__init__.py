"""Registered fairseq tasks; fairseq auto-imports these files too. Importing them all
here lets register_with_fairseq() work when the plugin was imported before fairseq."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
