"""Integrations of hierkern with other libraries, each an optional extra imported only on request.

``hierkern.integrations.transformers``: ``attn_implementation="hierkern"`` for Hugging Face models
(``pip install hierkern[transformers]``). ``import hierkern`` registers it by itself only when ``transformers``
is already imported (registering then costs nothing that building a model would not cost anyway); otherwise
call ``hierkern.integrations.transformers.register()`` once.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["register_if_imported"]


def register_if_imported() -> bool:
    """Register the ``transformers`` integration if ``transformers`` is already imported; report whether it did.

    ``import hierkern`` calls this. Without ``transformers`` in ``sys.modules`` it is one dictionary lookup: it
    never imports ``transformers`` (seconds) for users who do not use it. A ``transformers`` too old for the
    integration gets a warning here, not an error, so that ``import hierkern`` keeps working.
    """
    if "transformers" not in sys.modules:
        return False
    try:
        from . import transformers as hf
    except ImportError as exc:
        warnings.warn(
            f"hierkern did not register attn_implementation='hierkern' with transformers: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    hf.register()
    return True
