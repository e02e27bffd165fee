"""One sample of a split: its input (a tensor, or nested tensors), picked by ``input_key``, and
what the checks compute of it (a hash, whether it is constant) and say about it."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core.compare import largest_difference
from ..core.compare import same as same_tensor
from ..core.messages import exception_text, kind
from ..core.paths import children, named_tensors

__all__ = [
    "Input",
    "InputProblem",
    "Key",
    "LoadFailure",
    "Path",
    "as_key",
    "difference",
    "digest",
    "input_digest",
    "is_constant",
    "key_path",
    "path_text",
    "pick_input",
    "same",
    "shape_text",
    "value_text",
]

#: One step of a path into a nested sample, and a path (``("inputs", "image")``).
Key = Union[int, str]


Path = Tuple[Key, ...]


#: The input of a sample: its tensors with their paths in the sample. A plain input (one
#: tensor, picked by input_key) has the single path ``()``.
Input = Tuple[Tuple[Path, torch.Tensor], ...]


# -- one sample: its input and its target -------------------------------------------------
@dataclass
class LoadFailure:
    """Loading a sample failed; stands in for the sample. ``text`` is the exception
    (``Type: message``) or, when ``raised`` is False, what went wrong. ``timed_out``: a load
    in the main process that did not finish within the loader timeout."""

    text: str
    index_error: bool = False
    raised: bool = True
    timed_out: bool = False

    @classmethod
    def of(cls, exc: BaseException) -> "LoadFailure":
        return cls(exception_text(exc), isinstance(exc, IndexError))


def _advice(value: Any) -> str:
    """What to do about an input that is no tensor and a sample that holds none."""
    if value is None:
        return (
            "__getitem__ gives None instead of a sample or an input (a missing return "
            "statement, a failed read that is not raised)"
        )
    if type(value).__module__.startswith("PIL."):
        return (
            "the split has no ToTensor-like transform. Add one to its transforms "
            "(torchvision.transforms.ToTensor(), or transforms.v2.ToImage() followed by "
            "transforms.v2.ToDtype(torch.float32, scale=True))"
        )
    if isinstance(value, (str, bytes)):
        return (
            "the split gives raw text. Encode it in the split's transform (a tokenizer "
            "that returns tensors); the checks look at tensors"
        )
    if isinstance(value, (list, tuple)):
        return (
            "convert it to a tensor in the split's transform (for a Hugging Face "
            "datasets.Dataset: dataset.with_format('torch'))"
        )
    return "convert it to a tensor in the split's transform"


@dataclass
class InputProblem:
    """The input of a sample cannot be picked: ``kind`` is "key" (self.input_key does not fit
    the sample; ``fix`` is a key that would) or "type" (the sample holds no tensor: the data
    needs a transform)."""

    kind: str
    text: str
    fix: Any = None


def key_path(key: Any) -> Path:
    """input_key or target_key as a path: None -> (), 1 -> (1,), ("a", 0) -> ("a", 0)."""
    if key is None:
        return ()
    return tuple(key) if isinstance(key, tuple) else (key,)


def path_text(path: Path) -> str:
    """A path as messages name it: ``sample['inputs']['image']``."""
    return "sample" + "".join(f"[{key!r}]" for key in path)


def as_key(path: Path) -> Any:
    """A path as the user sets it: ("image",) -> "image", (0, 1) -> (0, 1)."""
    return path[0] if len(path) == 1 else path


def _get(container: Any, key: Key) -> Any:
    if dataclasses.is_dataclass(container) and not isinstance(container, type):
        if isinstance(key, str) and key in {f.name for f in dataclasses.fields(container)}:
            return getattr(container, key)
        raise KeyError(key)
    if isinstance(container, (str, bytes)):
        raise TypeError("a str has no elements")
    return container[key]


def _follow(sample: Any, path: Path) -> Tuple[Any, Optional[str]]:
    """The value at ``path`` in ``sample``, or (None, what the part before it holds)."""
    value = sample
    for depth, key in enumerate(path):
        try:
            value = _get(value, key)
        except (KeyError, IndexError, TypeError, AttributeError):
            fields = children(value)
            holder = "it" if depth == 0 else path_text(path[:depth])
            return None, f" ({holder} has {[k for k, _ in fields]})" if fields else ""
    return value, None


def _numpy_to_tensor(value: Any) -> Any:
    """A numpy array or scalar as a tensor, as DataLoader's default_convert converts it."""
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biufc":
        return torch.as_tensor(value)
    return value


def _is_numeric_list(value: Any) -> bool:
    """A (nested) list or tuple of Python numbers: token ids, a feature vector."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    first = value[0]
    if isinstance(first, (list, tuple)):
        return all(_is_numeric_list(item) for item in value)
    return all(isinstance(item, (bool, int, float, np.generic)) for item in value)


def _leaf(value: Any) -> Union[torch.Tensor, str, None]:
    """A tensor for what the checks inspect as a tensor, a problem text for a list that
    cannot be one, else None."""
    value = _numpy_to_tensor(value)
    if isinstance(value, torch.Tensor):
        return value
    if _is_numeric_list(value):
        try:
            return torch.as_tensor(value)
        except (ValueError, TypeError, RuntimeError) as exc:
            return f"torch.as_tensor cannot convert it ({exception_text(exc)})"
    return None


#: What a nested input may hold besides tensors: metadata, not looked at.
_METADATA = (type(None), bool, int, float, complex, str, bytes)


def _nested_leaves(value: Any, path: Path, found: List[Tuple[Path, torch.Tensor]]) -> Optional[str]:
    """Collect the tensors of a nested input into ``found``; what is wrong, if anything."""
    leaf = _leaf(value)
    if isinstance(leaf, torch.Tensor):
        found.append((path, leaf))
        return None
    if isinstance(leaf, str):
        return f"has a {type(value).__name__} as {path_text(path)} that {leaf}"
    fields = children(value)
    if fields is None:
        if isinstance(value, _METADATA):
            return None  # an id, a file name, a flag next to the tensors
        return f"has {kind(value)} as {path_text(path)}, not a tensor: {_advice(value)}"
    for key, item in fields:
        problem = _nested_leaves(item, (*path, key), found)
        if problem is not None:
            return problem
    return None


def pick_input(sample: Any, key: Any) -> Union[Input, InputProblem]:
    """The input of a sample, chosen by ``key`` (an index, a key or a path; None: the sample
    itself when it is a tensor, else its first element). A tensor (or a numpy array, or a
    list of numbers, converted to one) is a plain input; a tuple, list or dict of them is a
    nested input, of which every tensor is inspected."""
    path = key_path(key)
    if path:
        picked, holds = _follow(sample, path)
        if holds is not None:
            if children(sample) is None and not _has_tensor(sample) and _leaf(sample) is None:
                return InputProblem(
                    "type",
                    f"is {kind(sample)}, not a tensor or a tuple or "
                    f"dict holding one: {_advice(sample)}",
                )
            return InputProblem("key", f"has no element {key!r}{holds}", _tensor_key(sample))
        described = f"element {key!r}"
    else:
        leaf = _leaf(sample)
        if isinstance(leaf, torch.Tensor):
            return (((), leaf),)
        fields = children(sample)
        if not fields:
            return InputProblem("type", f"is {kind(sample)}, not a tensor: {_advice(sample)}")
        first, picked = fields[0]
        path = (first,)
        described = f"element {first!r}"
    leaf = _leaf(picked)
    if isinstance(leaf, torch.Tensor):
        return (((), leaf),)
    if isinstance(leaf, str):
        return InputProblem(
            "type",
            f"has {kind(picked)} as {described} (the input) that {leaf}: {_advice(picked)}",
        )
    if children(picked) is not None:
        found: List[Tuple[Path, torch.Tensor]] = []
        problem = _nested_leaves(picked, path, found)
        if problem is not None:
            return InputProblem("type", problem)
        if found:
            return tuple(found)
    tensors = [text for text, _ in named_tensors(sample, "sample")]
    if tensors:
        return InputProblem(
            "key",
            f"has {kind(picked)} as {described}, "
            + ("which holds no tensor" if children(picked) is not None else "not a tensor")
            + f" (its tensors: {', '.join(tensors)})",
            _tensor_key(sample),
        )
    return InputProblem(
        "type",
        f"has {kind(picked)} as {described} (the input), not a torch.Tensor: {_advice(picked)}",
    )


def _has_tensor(sample: Any) -> bool:
    return any(True for _ in named_tensors(sample))


def _tensor_key(sample: Any, path: Path = ()) -> Any:
    """The key (or the path) of the first tensor in a sample, if any."""
    for key, value in children(sample) or ():
        if isinstance(_leaf(value), torch.Tensor):
            return as_key((*path, key))
    for key, value in children(sample) or ():
        if children(value):
            found = _tensor_key(value, (*path, key))
            if found is not None:
                return found
    return None


def digest(tensor: torch.Tensor) -> bytes:
    """A 128-bit hash of a tensor's shape, dtype and bytes (equal tensors, equal hashes)."""
    return _digests(tensor.shape, tensor.dtype, tensor.detach().reshape(1, -1))[0]


def _digests(shape: Sequence[int], dtype: torch.dtype, rows: torch.Tensor) -> List[bytes]:
    """The digests of the tensors of one shape and dtype stacked as the rows of ``rows``."""
    header = f"{tuple(shape)}{dtype}".encode()
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    data = rows.contiguous().view(torch.uint8).numpy()
    return [_hash(header, row.data) for row in data]


def _hash(header: bytes, data: memoryview) -> bytes:
    hashed = hashlib.blake2b(header, digest_size=16)
    hashed.update(data)
    return hashed.digest()


def _combined(leaves: Sequence[Tuple[Path, bytes]]) -> bytes:
    """The hash of a nested input from the hashes of its tensors and their paths."""
    if len(leaves) == 1 and leaves[0][0] == ():
        return leaves[0][1]
    hashed = hashlib.blake2b(b"nested", digest_size=16)
    for path, leaf in leaves:
        hashed.update(repr(path).encode())
        hashed.update(leaf)
    return hashed.digest()


def input_digest(value: Input) -> bytes:
    return _combined([(path, digest(tensor)) for path, tensor in value])


def is_constant(value: Input) -> bool:
    """Every value of the input equal (silence, a blank image), or no value at all."""
    parts = [tensor.detach().reshape(-1) for _, tensor in value]
    if any(part.is_complex() for part in parts):
        return False
    flat = torch.cat([part.double() for part in parts]) if parts else torch.zeros(0)
    if flat.numel() == 0:
        return True
    if not bool(torch.isfinite(flat).all()):
        return False
    return bool(flat.min() == flat.max())


def same(first: Input, second: Input) -> bool:
    """Exactly equal inputs (the same tensors at the same paths), NaN at the same places
    counting as equal."""
    return len(first) == len(second) and all(
        path_a == path_b and same_tensor(a, b) for (path_a, a), (path_b, b) in zip(first, second)
    )


def _tensor_difference(first: torch.Tensor, second: torch.Tensor) -> str:
    text = largest_difference(first, second)
    return text[len("n/a: ") :] if text.startswith("n/a: ") else f"max difference {text}"


def difference(first: Input, second: Input) -> str:
    """How two inputs of one sample differ, for messages."""
    if [path for path, _ in first] != [path for path, _ in second]:
        return (
            f"tensors at {', '.join(path_text(p) for p, _ in first)} vs "
            f"{', '.join(path_text(p) for p, _ in second)}"
        )
    for (path, a), (_, b) in zip(first, second):
        if not same_tensor(a, b):
            text = _tensor_difference(a, b)
            return f"{path_text(path)}: {text}" if path else text
    return "no difference"


def shape_text(path: Path, shape: Tuple[int, ...]) -> str:
    """A shape of an input tensor, for messages: "(1, 6, 5)", "(3,) as sample[0][1]"."""
    return f"{shape} as {path_text(path)}" if path else str(shape)


def value_text(value: float) -> str:
    """A value as messages show it: the shortest text that tells it from its neighbours in
    float32 when it is one (0.7, 2.6400001), else in float64."""
    text = str(np.float32(value)) if float(np.float32(value)) == value else repr(value)
    return text[:-2] if text.endswith(".0") else text
