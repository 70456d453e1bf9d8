"""Tracing helpers: the one switch between eager shortcuts and traceable code, and the one place
where tracing a timm base model needs torch's help to stay size-independent."""
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

__all__ = ['is_compiling', 'CopyingContiguous']


def is_compiling() -> bool:
    """True under torch.compile / torch.export, where sizes may be symbolic and size-dependent
    branches would tie the traced program to its example input; False in eager and TorchScript."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.compiler.is_compiling()


class CopyingContiguous(TorchFunctionMode):
    """While active, ``Tensor.contiguous()`` is an explicit copy (``clone`` in that memory format).

    The values are the same. It matters only while tracing with symbolic sizes: ``contiguous()`` of
    a cropped view (timm's Swin crops its window padding that way) makes torch decide whether the
    crop removed anything, so an exported program would refuse every size padded differently from
    its example; a copy needs no such decision (docs/mscsa.md, "Deploy paths").
    """

    def __torch_function__(
            self,
            func: Callable,
            types: Sequence[type],
            args: Sequence[Any] = (),
            kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.contiguous:
            return args[0].clone(memory_format=kwargs.get('memory_format', torch.contiguous_format))
        return func(*args, **kwargs)
