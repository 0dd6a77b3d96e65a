"""Criterions; fairseq only auto-imports models/ and tasks/, so every module here is
imported from this package (and this package from the plugin's ``__init__``)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
