"""Close-name suggestions for error messages (our scripts, configs and the detectron2 adapter)."""
import difflib
from typing import Iterable

__all__ = ['close_names_hint']


def close_names_hint(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """``' (did you mean a or b?)'`` for the names of ``candidates`` close to ``name``, else ``''``."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=cutoff)
    return f" (did you mean {' or '.join(close)}?)" if close else ''
