"""HemBLIP: BLIP captioning of white blood cells with attribute-bearing captions.

Public surface: the ontology (:mod:`hemblip.ontology`), captions and their parser
(:mod:`hemblip.captions`) and the batch :class:`Captioner`. Importing this package is cheap:
torch/transformers load only when a ``Captioner`` is created. Never imports Ray (the distributed
training launcher ``hemblip.train_ray`` is the one exception, imported only on demand).
"""

from __future__ import annotations

__all__ = ["Captioner", "CaptionResult", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Captioner", "CaptionResult"):
        from hemblip import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'hemblip' has no attribute {name!r}")
