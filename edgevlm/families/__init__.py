"""Runtime model families: one module per family, found through a registry.

See :mod:`edgevlm.families.base` for the hooks; :func:`family_for` picks the
family of a loaded model's files.
"""

from __future__ import annotations

from edgevlm.families.base import (FAMILIES, Family, FamilyOptions, ImageCost, family_for,
                                   load_builtin_families, register)

__all__ = ["FAMILIES", "Family", "FamilyOptions", "ImageCost", "family_for", "load_builtin_families",
           "register"]
