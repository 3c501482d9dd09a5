"""Model families: one adapter per architecture, registered by decorator (see ``base.py``).

Importing this package registers the built-in families.
"""

from . import llava, llava_next  # noqa: F401  (registers LLaVA-1.5 and LLaVA-NeXT)
from .base import (FAMILIES, DecoderParts, Family, PromptTemplate, VisionGeometry, VisionUnit, family_for_config,
                   family_named, family_of, register_family)

__all__ = ["FAMILIES", "DecoderParts", "Family", "PromptTemplate", "VisionGeometry", "VisionUnit", "family_for_config",
           "family_named", "family_of", "register_family"]
