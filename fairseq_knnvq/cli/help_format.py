"""The help formatter of the console scripts: argparse's ``ArgumentDefaultsHelpFormatter``
without the noise it adds, i.e. no ``(default: None)`` / ``(default: False)`` on options
that have no default or are flags, and none after a help text that already says its
default in words (``(default: every CPU)``)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)
