"""Copies of a split, made as a spawned worker unpickles it (tensors and arrays shared, not
copied), and the size of its pickle."""

from __future__ import annotations

import io
import pickle
import types
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np
import torch

from ..core.messages import forget

__all__ = ["Pickled", "pickled_size"]


# -- copies of a split, as a spawned worker unpickles it ---------------------------------------
def _is_buffer(obj: Any) -> bool:
    """Data that pickling would copy byte by byte and that the checks never change: tensors,
    numeric arrays, PIL images, Arrow tables (a Hugging Face dataset's data)."""
    if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
        return True
    if isinstance(obj, np.ndarray):
        return bool(obj.dtype != object)
    module = type(obj).__module__
    return module.startswith(("pyarrow.", "PIL.")) or module == "pyarrow"


#: Types pickled as they are (never shared); a fast path of persistent_id.
_PICKLED = frozenset({type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set})


class _SharingPickler(pickle.Pickler):
    """A pickler that writes tensors and arrays as references to the objects themselves
    (persistent ids) instead of their bytes, and with ``share_functions`` functions too (so
    that a lambda does not stop a copy)."""

    def __init__(self, file: Any, share_functions: bool) -> None:
        super().__init__(file)
        self.shared: List[Any] = []
        self.share_functions = share_functions

    def persistent_id(self, obj: Any) -> Optional[int]:
        if type(obj) in _PICKLED:
            return None
        if isinstance(obj, torch.Tensor) and obj.requires_grad and not obj.is_leaf:
            # as torch refuses it when a spawned worker's dataset is pickled
            raise pickle.PicklingError(
                "Cowardly refusing to serialize non-leaf tensor which requires_grad "
                "(call .detach() on the tensors the dataset keeps)"
            )
        if _is_buffer(obj) or (
            self.share_functions
            and isinstance(obj, (types.FunctionType, types.BuiltinFunctionType))
        ):
            self.shared.append(obj)
            return len(self.shared) - 1
        return None


class _SharingUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, shared: List[Any]) -> None:
        super().__init__(file)
        self.shared = shared

    def persistent_load(self, pid: Any) -> Any:
        return self.shared[pid]


class _Discard(io.RawIOBase):
    """A file that counts the bytes written to it and keeps none."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.size += size
        return size


def pickled_size(dataset: Any) -> int:
    """Pickle ``dataset`` as a DataLoader started with spawn would, into a file that keeps
    nothing (so that a large in-memory dataset costs no second copy), and return the size
    of the pickle without its tensors and arrays. Raises what pickling raises."""
    written = _Discard()
    _SharingPickler(written, share_functions=False).dump(dataset)
    return written.size


@dataclass
class Pickled:
    """A split pickled for a copy: the pickle's bytes and the objects it refers to."""

    data: bytes
    shared: List[Any]

    @classmethod
    def of(cls, dataset: Any) -> Optional["Pickled"]:
        """None if the split cannot be pickled (test_data_loading reports that)."""
        file = io.BytesIO()
        pickler = _SharingPickler(file, share_functions=True)
        try:
            pickler.dump(dataset)
        except Exception as exc:
            forget(exc)
            return None
        return cls(file.getvalue(), pickler.shared)

    def load(self) -> Any:
        return _SharingUnpickler(io.BytesIO(self.data), self.shared).load()
