"""``hierkern.patch_model``: one line that puts hierkern's drop-ins into an existing model.

Every ``torch.nn.MultiheadAttention``, ``torch.nn.TransformerEncoderLayer`` and ``torch.nn.TransformerEncoder``
(exactly those classes) in a model becomes ``hierkern``'s subclass *in place*: the same module objects, the
same parameter objects (an optimiser built before the call keeps training them), the same state and
hooks. Only the class changes, so only ``forward`` changes, and the drop-ins compute torch's results at every
valid position (padded positions of padding-masked self-attention come back as zeros).

Subclasses of those torch classes are left alone (their own code may override ``forward`` or read
internals), and the report says so, as it does for the decoder modules hierkern has no drop-in for (their
attention modules are swapped one by one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .nn.encoder import TransformerEncoder, TransformerEncoderLayer
from .nn.mha import MultiheadAttention

__all__ = ["patch_model", "PatchReport"]

# torch class -> hierkern drop-in; each drop-in's ``adopt`` retypes an instance of exactly the torch class.
_DROP_INS = {
    nn.MultiheadAttention: MultiheadAttention,
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
    nn.TransformerEncoder: TransformerEncoder,
}
_NO_DROP_IN = (nn.TransformerDecoderLayer, nn.TransformerDecoder, nn.Transformer)


def _qualname(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn"):
        module = "torch.nn"
    elif module.startswith("hierkern"):
        module = "hierkern"
    return f"{module}.{cls.__qualname__}"


@dataclass
class PatchReport:
    """What ``patch_model`` did.

    Attributes:
        swapped: ``(name, torch class, hierkern class)`` for every module retyped (``name`` as in
            ``model.named_modules()``, ``""`` for the model itself).
        left: ``(name, class, reason)`` for every attention/transformer module left as it was.
    """

    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"hierkern.patch_model: swapped {len(self.swapped)} module(s), left {len(self.left)}"]
        width = max((len(name or "<model>") for name, *_ in self.swapped + self.left), default=0)
        for name, old, new in self.swapped:
            lines.append(f"  swapped  {name or '<model>':<{width}}  {old} -> {new}")
        for name, cls, reason in self.left:
            lines.append(f"  left     {name or '<model>':<{width}}  {cls}: {reason}")
        return "\n".join(lines)


def patch_model(model: nn.Module) -> PatchReport:
    """Swap hierkern's drop-ins into ``model`` in place and report what changed.

    ``torch.nn.MultiheadAttention``, ``TransformerEncoderLayer`` and ``TransformerEncoder`` instances (also
    the ones inside ``nn.Transformer`` and its decoder layers) become ``hierkern.MultiheadAttention``,
    ``hierkern.TransformerEncoderLayer`` and ``hierkern.TransformerEncoder``, keeping their parameters,
    buffers, train/eval mode and hooks. Outputs are torch's up to fp32 rounding at every valid position;
    on the varlen paths, positions that a key padding mask marks as padding in self-attention come back as
    zeros, which no valid position reads (decoders should pass ``memory_key_padding_mask`` as usual).

    Args:
        model: any ``nn.Module``; may itself be one of the swapped classes.

    Returns:
        A ``PatchReport`` (``print`` it for a table). Calling ``patch_model`` again swaps nothing more.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    # Classify first: adopting an encoder retypes its layers too, and those count as swapped here as well.
    modules = [(name, module, type(module)) for name, module in model.named_modules()]
    for name, module, cls in modules:
        if cls in _DROP_INS:
            drop_in = _DROP_INS[cls]
            if type(module) is cls:
                drop_in.adopt(module)
            report.swapped.append((name, _qualname(cls), _qualname(drop_in)))
        elif cls in _NO_DROP_IN:
            report.left.append(
                (
                    name,
                    _qualname(cls),
                    "no hierkern drop-in (the attention and encoder modules inside it are swapped one by one)",
                )
            )
        elif issubclass(cls, tuple(_DROP_INS.values())):
            report.left.append((name, _qualname(cls), "already hierkern's"))
        else:
            for base in _DROP_INS:
                if issubclass(cls, base):
                    why = f"a subclass of {_qualname(base)}: its own code may override forward, so it is not swapped"
                    report.left.append((name, _qualname(cls), why))
                    break
    return report
