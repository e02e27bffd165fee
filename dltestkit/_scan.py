"""The one shared pass of DatasetTests over each split: loading, inspecting, caching.

Each sample of a split is loaded at most twice across all dataset checks:

- the *scan*: one pass with DataLoader worker processes. Each worker inspects the samples
  where it loads them (the input's shape, value range and hash, the target) and sends back
  only what it saw, plus copies of the probe inputs; it also batches the samples with the
  split's collate function, as training would, and reports whether that failed;
- the *probes*: a few samples loaded once more in the main process (for a map-style split
  the first, the last and random indices, for a stream its first samples).

The main process never loads from the split object itself before the workers start: it
loads from a copy (pickled and unpickled as a spawned worker would, sharing the tensors and
arrays), so that a file the dataset opens lazily is not opened before the workers fork and
then shared by them. Each load in the main process runs in a helper thread and is bounded by
the loader timeout.

The results are cached per test class, keyed by everything that changes what is scanned,
and dropped by a class cleanup when the class's tests are done.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import math
import multiprocessing
import operator
import os
import pickle
import queue
import re
import threading
import traceback
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Hashable,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
)

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ._random import derived_seed, make_deterministic, preserved_global_state
from ._tensors import _fields, named_tensors

#: Where a sample comes from: an index of a map-style split, or (worker, n) for the n-th
#: sample a worker read from a stream; (-1, n) is the n-th read in the main process.
Position = Union[int, Tuple[int, int]]
#: How many positions a message lists at most.
SHOWN = 5
#: One step of a path into a nested sample, and a path (``("inputs", "image")``).
Key = Union[int, str]
Path = Tuple[Key, ...]
#: The input of a sample: its tensors with their paths in the sample. A plain input (one
#: tensor, picked by input_key) has the single path ``()``.
Input = Tuple[Tuple[Path, torch.Tensor], ...]

T = TypeVar("T")


def where(position: Position) -> str:
    """A position as messages name it: "index 17", "sample 3 of worker 1"."""
    if isinstance(position, tuple):
        worker, number = position
        if worker < 0:
            return f"sample {number} of the stream read in the main process"
        return f"sample {number} of worker {worker}"
    return f"index {position}"


def listed(positions: Sequence[Position], total: Optional[int] = None) -> str:
    """The first positions, "index 3, index 9 and 12 more"."""
    total = len(positions) if total is None else total
    text = ", ".join(where(p) for p in positions[:SHOWN])
    return text + (f" and {total - SHOWN} more" if total > SHOWN else "")


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def sized(dataset: Any) -> Optional[int]:
    """``len(dataset)``, or None for a stream without ``__len__``."""
    try:
        return len(dataset)
    except TypeError:
        if is_stream(dataset):
            return None
        raise


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, complex, str, bytes))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_callable(fn: Any) -> str:
    """A function as messages name it: "torch.utils.data.default_collate",
    "functools.partial(mypackage.pad, max_len=64)", "a mypackage.Collate object"."""
    if isinstance(fn, functools.partial):
        arguments = [_short(a) if _plain(a) else _describe_value(a) for a in fn.args]
        arguments += [
            f"{k}={_short(v) if _plain(v) else _describe_value(v)}" for k, v in fn.keywords.items()
        ]
        return f"functools.partial({', '.join([describe_callable(fn.func), *arguments])})"
    fn = getattr(fn, "__func__", fn)
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
        module = getattr(fn, "__module__", None) or "?"
        if module == "torch.utils.data._utils.collate":
            module = "torch.utils.data"
        return f"{module}.{fn.__qualname__}"
    return _describe_value(fn)


def _describe_value(value: Any) -> str:
    kind = type(value)
    return f"{_article(kind.__name__)} {kind.__module__}.{kind.__qualname__} object"


def callable_key(fn: Any, depth: int = 0) -> Hashable:
    """What identifies a function for the cache: its name, and for a functools.partial or a
    callable object the arguments or attributes that are plain values (``max_len=64``), so
    that changing them scans again, while equal ones made anew in each setUp do not."""
    if depth > 3:
        return type(fn).__qualname__
    if isinstance(fn, functools.partial):
        return (
            "partial",
            callable_key(fn.func, depth + 1),
            tuple(_value_key(a, depth) for a in fn.args),
            tuple(sorted((k, _value_key(v, depth)) for k, v in fn.keywords.items())),
        )
    function = getattr(fn, "__func__", fn)
    if isinstance(function, types.FunctionType):
        # a lambda or a function made by a factory: where it is defined, and the plain
        # values it closes over or defaults to (make_collate(max_len=64))
        code = function.__code__
        captured = [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
        captured += list(function.__defaults__ or ())
        return (
            describe_callable(function),
            code.co_filename,
            code.co_firstlineno,
            tuple(_value_key(value, depth) for value in captured),
        )
    if isinstance(function, (types.BuiltinFunctionType, type)):
        return describe_callable(function)
    attributes = getattr(fn, "__dict__", None)
    plain = (
        tuple(
            sorted((k, _value_key(v, depth)) for k, v in attributes.items() if isinstance(k, str))
        )
        if isinstance(attributes, dict)
        else ()
    )
    return (type(fn).__module__, type(fn).__qualname__, plain)


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # a variable not assigned yet
        return False
    return True


def _value_key(value: Any, depth: int) -> Hashable:
    if _plain(value):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)) and len(value) <= 16 and all(_plain(v) for v in value):
        return (type(value).__name__, tuple(value))
    if callable(value):
        return callable_key(value, depth + 1)
    return (type(value).__module__, type(value).__qualname__)


def exception_text(exc: BaseException) -> str:
    """``Type: message``, the message cut to its first line."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def forget(exc: BaseException) -> None:
    """Drop the frames an exception's traceback keeps alive (a DataLoader iterator among
    them), so that what they hold is released now, not by a later garbage collection."""
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def start_method(context: Optional[str]) -> str:
    """The start method of the scan's worker processes."""
    return context or multiprocessing.get_start_method()


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


# -- loads in the main process, bounded by the loader timeout ----------------------------------
class TimedOut(Exception):
    """A load in the main process did not finish within the loader timeout."""


class _Job:
    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.value = self.function()
        except BaseException as exc:  # handed to the caller, who re-raises it
            self.error = exc
        finally:
            self.function = _nothing
            self.done.set()


def _nothing() -> None:
    return None


def _serve(jobs: "queue.SimpleQueue[Optional[_Job]]") -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()
        del job


class MainProcess:
    """Where the checks load a few samples in the main process, for one set of loads.

    ``source`` is a copy of the split (``pickled``: loaded by the first job) or the split
    itself. One daemon thread runs every load, so that a handle the dataset opens lazily
    is used by the thread that opened it; the caller waits at most ``timeout`` seconds for
    each. After a load that timed out the thread is left blocked (a daemon thread, which
    ends with the process) and every later load fails at once. ``close`` ends the thread
    (before the scan forks its workers: forking a process that runs threads is unsafe).
    """

    def __init__(
        self, timeout: float, pickled: Optional[Pickled] = None, source: Any = None
    ) -> None:
        self.timeout = timeout
        self.source = source
        self.stuck = False
        self.copy_error: Optional[str] = None
        self._jobs: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs,), name="dltestkit main-process loads", daemon=True
        )
        self._thread.start()
        if pickled is not None:
            try:
                self.source = self.call(pickled.load)
            except TimedOut:
                pass
            except Exception as exc:
                self.copy_error = exception_text(exc)
                forget(exc)

    def call(self, function: Callable[[], T]) -> T:
        """``function()`` run by the thread; raises what it raised, or TimedOut."""
        if self.stuck:
            raise TimedOut()
        job = _Job(function)
        self._jobs.put(job)
        if not job.done.wait(self.timeout):
            self.stuck = True
            raise TimedOut()
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        value: T = job.value
        job.value = None
        return value

    def close(self) -> None:
        """End the thread (a blocked one when its load returns, if ever)."""
        self.source = None
        self._jobs.put(None)
        if not self.stuck:
            self._thread.join(self.timeout)


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


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _kind(value: Any) -> str:
    """What a non-tensor value is, for messages: "a PIL Image", "None", "a str"."""
    if value is None:
        return "None"
    name = type(value).__name__
    if type(value).__module__.startswith("PIL."):
        name = "PIL Image"
    return f"{_article(name)} {name}"


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
            fields = _fields(value)
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
    fields = _fields(value)
    if fields is None:
        if isinstance(value, _METADATA):
            return None  # an id, a file name, a flag next to the tensors
        return f"has {_kind(value)} as {path_text(path)}, not a tensor: {_advice(value)}"
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
            if _fields(sample) is None and not _has_tensor(sample) and _leaf(sample) is None:
                return InputProblem(
                    "type",
                    f"is {_kind(sample)}, not a tensor or a tuple or "
                    f"dict holding one: {_advice(sample)}",
                )
            return InputProblem("key", f"has no element {key!r}{holds}", _tensor_key(sample))
        described = f"element {key!r}"
    else:
        leaf = _leaf(sample)
        if isinstance(leaf, torch.Tensor):
            return (((), leaf),)
        fields = _fields(sample)
        if not fields:
            return InputProblem("type", f"is {_kind(sample)}, not a tensor: {_advice(sample)}")
        first, picked = fields[0]
        path = (first,)
        described = f"element {first!r}"
    leaf = _leaf(picked)
    if isinstance(leaf, torch.Tensor):
        return (((), leaf),)
    if isinstance(leaf, str):
        return InputProblem(
            "type",
            f"has {_kind(picked)} as {described} (the input) that {leaf}: {_advice(picked)}",
        )
    if _fields(picked) is not None:
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
            f"has {_kind(picked)} as {described}, "
            + ("which holds no tensor" if _fields(picked) is not None else "not a tensor")
            + f" (its tensors: {', '.join(tensors)})",
            _tensor_key(sample),
        )
    return InputProblem(
        "type",
        f"has {_kind(picked)} as {described} (the input), not a torch.Tensor: {_advice(picked)}",
    )


def _has_tensor(sample: Any) -> bool:
    return any(True for _ in named_tensors(sample))


def _tensor_key(sample: Any, path: Path = ()) -> Any:
    """The key (or the path) of the first tensor in a sample, if any."""
    for key, value in _fields(sample) or ():
        if isinstance(_leaf(value), torch.Tensor):
            return as_key((*path, key))
    for key, value in _fields(sample) or ():
        if _fields(value):
            found = _tensor_key(value, (*path, key))
            if found is not None:
                return found
    return None


#: The keys a target is usually stored under, suggested when self.target_key does not fit
#: (``class_labels``: the per-object labels of transformers' detection models).
TARGET_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls", "class_labels")


def target_key_of(sample: Any) -> Any:
    return next((key for key, _ in _fields(sample) or () if key in TARGET_KEYS), None)


def labels_inside(sample: Any, key: Any) -> Any:
    """When the target at ``key`` is a container (a detection target dict), the path of the
    class labels in it (``(1, "labels")``), else None."""
    if isinstance(sample, torch.Tensor) or _fields(sample) is None:
        return None
    value, holds = _follow(sample, key_path(key))
    inner = target_key_of(value) if holds is None and not isinstance(value, torch.Tensor) else None
    return None if inner is None else (*key_path(key), inner)


#: pick_target's result for a sample without a target at self.target_key.
MISSING = "missing"

#: How many distinct values of a target Target.text shows.
_VALUES_SHOWN = 8


@dataclass(frozen=True)
class Target:
    """An integer class target as the scan reports it: a label (``shape`` ``()``) or a
    tensor of labels of any shape (a label map, per-object labels), element by element.

    ``key`` tells equal targets from different ones: the label itself, or for a tensor its
    digest and shape. ``values`` is every distinct value with its number of elements.
    """

    key: Hashable
    shape: Tuple[int, ...]
    values: Tuple[Tuple[int, int], ...]
    dtype: str = "int"

    @property
    def plain(self) -> Optional[int]:
        """The label of a target of shape (), which the scan sends as the int itself."""
        return self.key if not self.shape and isinstance(self.key, int) else None

    @property
    def text(self) -> str:
        """The target as messages show it: "target 3", "a target of shape (8, 8) with
        values 0, 3, 255"."""
        if not self.shape:
            return f"target {self.key}"
        if not self.values:
            return f"an empty target of shape {self.shape}"
        shown = ", ".join(str(value) for value, _ in self.values[:_VALUES_SHOWN])
        more = ", ..." if len(self.values) > _VALUES_SHOWN else ""
        return f"a target of shape {self.shape} with values {shown}{more}"

    def described(self) -> str:
        """What the target is: "an int64 tensor of shape (1,) (3)"."""
        if not self.shape and self.dtype == "int":
            return f"the int {self.key}"
        one = f" ({self.values[0][0]})" if len(self.values) == 1 and _numel(self.shape) == 1 else ""
        if self.dtype == "list":
            return f"a list of shape {self.shape}{one}"
        return f"{_article(self.dtype)} {self.dtype} tensor of shape {self.shape}{one}"


def as_target(value: Union[int, Target, None]) -> Target:
    """A target as the scan reported it (a label as the int itself) as a Target."""
    if isinstance(value, Target):
        return value
    assert value is not None
    return Target(value, (), ((value, 1),))


def _numel(shape: Tuple[int, ...]) -> int:
    return math.prod(shape)


def pick_target(sample: Any, key: Any) -> Tuple[Optional[Target], Optional[str]]:
    """``(target, None)`` for an integer class target (an int, or an integer tensor of any
    shape), ``(None, what it is)`` otherwise, ``(None, MISSING)`` when the sample has no
    element ``key`` (an index, key or path)."""
    if isinstance(sample, torch.Tensor) or _fields(sample) is None:
        return None, MISSING
    value, holds = _follow(sample, key_path(key))
    if holds is not None:
        return None, MISSING
    target, problem = class_target(value)
    inner = next((k for k, item in _fields(value) or () if class_target(item)[0] is not None), None)
    if problem is not None and inner is not None:
        path = as_key((*key_path(key), inner))
        problem += f" (to check the class labels in it, set self.target_key = {path!r})"
    return target, problem


def class_target(value: Any) -> Tuple[Optional[Target], Optional[str]]:
    """A target value as a Target, or what it is when it is not an integer class target.
    Numpy arrays and lists of numbers are taken as the tensors they convert to."""
    original = value
    value = _numpy_to_tensor(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return Target(value, (), ((value, 1),)), None
    if isinstance(value, list) and not value:
        value = torch.zeros(0, dtype=torch.int64)  # no object in this sample
    elif _is_numeric_list(value):
        try:
            value = torch.as_tensor(value)
        except (ValueError, TypeError, RuntimeError) as exc:
            problem = exception_text(exc)
            return None, f"{_kind(value)} that torch.as_tensor cannot convert ({problem})"
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            shown = f" ({value.item()!r})" if value.numel() == 1 else ""
            what = f"{_article(dtype)} {dtype} tensor of shape {tuple(value.shape)}{shown}"
            if not isinstance(original, torch.Tensor):
                what = f"{_kind(original)} of {dtype} values ({original!r:.40})"
            return None, what
        if not isinstance(original, (torch.Tensor, np.ndarray, np.generic)):
            dtype = "list"
        if value.dim() == 0:
            label = int(value)
            return Target(label, (), ((label, 1),), dtype), None
        shape = tuple(value.shape)
        key = (digest(value), shape)
        return Target(key, shape, _value_counts(value.detach()), dtype), None
    fields = _fields(value)
    if fields is not None and not isinstance(value, str):
        return None, f"{_kind(value)} with elements {[k for k, _ in fields]}"
    return None, "None" if value is None else f"{_kind(value)} ({value!r:.40})"


def _value_counts(tensor: torch.Tensor) -> Tuple[Tuple[int, int], ...]:
    """Each distinct value of an integer tensor with its number of elements, in order."""
    flat = tensor.reshape(-1).to(torch.int64)
    if not flat.numel():
        return ()
    low, high = int(flat.min()), int(flat.max())
    if high - low < 2**16:  # a label map: counting is ten times faster than sorting
        counts = torch.bincount(flat - low)
        present = counts.nonzero().flatten()
        return tuple(zip((present + low).tolist(), counts[present].tolist()))
    distinct, numbers = torch.unique(flat, return_counts=True)
    return tuple(zip(distinct.tolist(), numbers.tolist()))


def batched_target(batch: Any, key: Any) -> Optional[Tuple[int, ...]]:
    """The shape of the targets in a batch made by the collate function, when the batch
    holds them as one tensor at ``key``; None when it keeps them apart (a list of target
    dicts) or holds no target there."""
    try:
        value, holds = _follow(batch, key_path(key))
    except Exception:  # a batch object that answers indexing in its own way
        return None
    if holds is not None or not isinstance(value, torch.Tensor):
        return None
    return tuple(value.shape)


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


def _same_tensor(first: torch.Tensor, second: torch.Tensor) -> bool:
    if first.shape != second.shape or first.dtype != second.dtype:
        return False
    if first.is_floating_point() or first.is_complex():
        nan_first, nan_second = torch.isnan(first), torch.isnan(second)
        return bool(
            torch.equal(nan_first, nan_second)
            and torch.equal(first[~nan_first], second[~nan_second])
        )
    return bool(torch.equal(first, second))


def same(first: Input, second: Input) -> bool:
    """Exactly equal inputs (the same tensors at the same paths), NaN at the same places
    counting as equal."""
    return len(first) == len(second) and all(
        path_a == path_b and _same_tensor(a, b) for (path_a, a), (path_b, b) in zip(first, second)
    )


def _tensor_difference(first: torch.Tensor, second: torch.Tensor) -> str:
    if first.shape != second.shape:
        return f"shape {tuple(first.shape)} vs {tuple(second.shape)}"
    if first.dtype != second.dtype:
        return f"dtype {first.dtype} vs {second.dtype}"
    keep = ~(torch.isnan(first) | torch.isnan(second)) if first.is_floating_point() else None
    delta = (first.double() - second.double()).abs()
    if keep is not None:
        delta = delta[keep]
    return f"max difference {float(delta.max()) if delta.numel() else float('nan'):.3g}"


def difference(first: Input, second: Input) -> str:
    """How two inputs of one sample differ, for messages."""
    if [path for path, _ in first] != [path for path, _ in second]:
        return (
            f"tensors at {', '.join(path_text(p) for p, _ in first)} vs "
            f"{', '.join(path_text(p) for p, _ in second)}"
        )
    for (path, a), (_, b) in zip(first, second):
        if not _same_tensor(a, b):
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


# -- what a worker reports about one batch -------------------------------------------------
@dataclass
class Extreme:
    """The lowest or highest value seen, and where: the sample and the tensor's path."""

    value: float
    position: Optional[Position] = None
    path: Path = ()


@dataclass
class BatchReport:
    """What a worker saw in one batch; small (no data but copies of the probe inputs)."""

    worker: int = -1
    pid: int = 0
    positions: List[Position] = field(default_factory=list)
    failures: List[Tuple[Position, LoadFailure]] = field(default_factory=list)
    input_problems: List[Tuple[Position, InputProblem]] = field(default_factory=list)
    #: (path, shape) of the input tensors -> [count, the first positions]
    shapes: Dict[Tuple[Path, Tuple[int, ...]], List[Any]] = field(default_factory=dict)
    tensors: int = 0
    low: Extreme = field(default_factory=lambda: Extreme(float("inf")))
    high: Extreme = field(default_factory=lambda: Extreme(float("-inf")))
    #: the machine epsilon of the coarsest floating-point dtype of the inputs
    float_eps: float = 0.0
    nonfinite: List[Position] = field(default_factory=list)
    #: per inspected sample: (position, hash or None, target or None, constant input); a
    #: label (a target of shape ()) as the int itself, which is smaller to send
    samples: List[Tuple[Position, Optional[bytes], Union[int, Target, None], bool]] = field(
        default_factory=list
    )
    #: the shape of the targets in the batch collate_fn made, when it holds them as one
    #: tensor at target_key (None: it keeps them apart, or holds none there)
    batched_target: Optional[Tuple[int, ...]] = None
    target_problems: List[Tuple[Position, str]] = field(default_factory=list)
    unlabelled: List[Position] = field(default_factory=list)  # the first samples without one
    unlabelled_count: int = 0
    kept: Dict[Position, Input] = field(default_factory=dict)
    collate_error: Optional[str] = None
    internal_error: Optional[str] = None


@dataclass(frozen=True)
class Inspection:
    """What the scan's workers look at; also the split's collate function."""

    input_key: Any
    target_key: Any
    collate_fn: Callable[[List[Any]], Any]
    probes: FrozenSet[Any] = frozenset()
    hash_inputs: bool = False
    stream: bool = False


class Inspector:
    """The collate function of the scan: runs in each worker on the samples of a batch,
    inspects them, batches them with the split's collate function, and returns a
    BatchReport instead of the batch."""

    def __init__(self, inspection: Inspection) -> None:
        self.inspection = inspection
        self.read = 0  # samples this worker read from a stream (each worker has its copy)

    def __call__(self, items: List[Any]) -> BatchReport:
        info = get_worker_info()
        report = BatchReport(worker=info.id if info is not None else -1, pid=os.getpid())
        try:
            self._inspect(items, report)
        except Exception:  # a bug of dltestkit, not of the data: reported as an error
            report.internal_error = traceback.format_exc()
        return report

    def _inspect(self, items: List[Any], report: BatchReport) -> None:
        check = self.inspection
        if check.stream:
            positions: List[Position] = [(report.worker, self.read + n) for n in range(len(items))]
            self.read += len(items)
            samples = list(items)
        else:
            positions = [index for index, _ in items]
            samples = [sample for _, sample in items]
        report.positions = positions
        inputs: List[Tuple[Position, Input]] = []
        labels: List[Tuple[Position, Union[int, Target, None]]] = []
        for position, sample in zip(positions, samples):
            if isinstance(sample, LoadFailure):
                report.failures.append((position, sample))
                continue
            picked = pick_input(sample, check.input_key)
            if isinstance(picked, InputProblem):
                report.input_problems.append((position, picked))
                continue
            label, problem = pick_target(sample, check.target_key)
            if problem is MISSING:
                report.unlabelled_count += 1
                if len(report.unlabelled) < SHOWN:
                    report.unlabelled.append(position)
            elif problem is not None:
                report.target_problems.append((position, problem))
            inputs.append((position, tuple((path, t.detach()) for path, t in picked)))
            plain = label.plain if label is not None else None
            labels.append((position, label if plain is None else plain))
        if report.failures or report.input_problems:
            return
        hashes, constant = _statistics(inputs, report, check.hash_inputs or check.stream)
        report.samples = [(p, hashes.get(p), label, p in constant) for p, label in labels]
        report.kept = {
            position: tuple((path, tensor.clone()) for path, tensor in value)
            for position, value in inputs
            if position in check.probes
        }
        try:
            batch = check.collate_fn(samples)
        except Exception as exc:
            report.collate_error = exception_text(exc)
        else:
            report.batched_target = batched_target(batch, check.target_key)


def _statistics(
    inputs: List[Tuple[Position, Input]], report: BatchReport, hash_inputs: bool
) -> Tuple[Dict[Position, bytes], Set[Position]]:
    """Shapes, extremes and non-finite samples into ``report``; the hashes of the inputs, if
    asked for, and the positions of the constant inputs (every value equal, or none)."""
    groups: Dict[Tuple[Tuple[int, ...], torch.dtype], List[Tuple[Position, Path, torch.Tensor]]] = (
        collections.defaultdict(list)
    )
    for position, value in inputs:
        for path, tensor in value:
            shape = tuple(tensor.shape)
            groups[shape, tensor.dtype].append((position, path, tensor))
            seen = report.shapes.setdefault((path, shape), [0, []])
            seen[0] += 1
            if len(seen[1]) < SHOWN:
                seen[1].append(position)
        report.tensors += len(value)
    leaf_hashes: Dict[Tuple[Position, Path], bytes] = {}
    spans: Dict[Position, List[float]] = {}
    varying: Set[Position] = set()  # inputs with a NaN, a complex tensor, or unequal values
    nonfinite: Set[Position] = set()
    for (shape, dtype), members in groups.items():
        keys = [(position, path) for position, path, _ in members]
        flat = torch.stack([tensor for _, _, tensor in members]).reshape(len(members), -1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        if hash_inputs:
            leaf_hashes.update(zip(keys, _digests(shape, dtype, flat)))
        if flat.is_complex():
            varying.update(position for position, _ in keys)
            continue
        if flat.shape[1] == 0:
            continue
        if flat.is_floating_point():
            report.float_eps = max(report.float_eps, torch.finfo(flat.dtype).eps)
            finite = torch.isfinite(flat).all(dim=1)
            if not bool(finite.all()):
                ok = finite.tolist()
                for (position, _), good in zip(keys, ok):
                    if not good:
                        nonfinite.add(position)
                keys = [key for key, good in zip(keys, ok) if good]
                flat = flat[finite]
        if not keys:
            continue
        lows, highs = flat.amin(dim=1), flat.amax(dim=1)
        low, high = float(lows.min()), float(highs.max())
        if low < report.low.value:
            report.low = Extreme(low, *keys[int(lows.argmin())])
        if high > report.high.value:
            report.high = Extreme(high, *keys[int(highs.argmax())])
        for (position, _), row_low, row_high in zip(keys, lows.tolist(), highs.tolist()):
            span = spans.get(position)
            if span is None:
                spans[position] = [row_low, row_high]
            else:
                span[0], span[1] = min(span[0], row_low), max(span[1], row_high)
    report.nonfinite += [position for position, _ in inputs if position in nonfinite]
    varying |= nonfinite
    constant = {
        position
        for position, _ in inputs
        if position not in varying
        and (position not in spans or spans[position][0] == spans[position][1])
    }
    hashes = (
        {
            position: _combined([(path, leaf_hashes[position, path]) for path, _ in value])
            for position, value in inputs
        }
        if hash_inputs
        else {}
    )
    return hashes, constant


class Indexed(Dataset[Any]):
    """A map-style split whose samples come with their index; a sample that cannot be
    loaded becomes a LoadFailure instead of an exception that stops the DataLoader.

    It is what ``torch.utils.data.get_worker_info().dataset`` is in the scan's workers:
    reading or setting an attribute on it reads or sets the split's (a worker_init_fn that
    opens a file per worker and stores it on the dataset works as with your DataLoader).
    """

    def __init__(self, dataset: Any) -> None:
        object.__setattr__(self, "dataset", dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: List[int]) -> List[Tuple[int, Any]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        batched: Optional[str] = None
        if getitems is not None:
            try:
                samples = getitems(list(indices))
            except Exception as exc:  # find the index that fails, one by one
                batched = exception_text(exc)
            else:
                if len(samples) == len(indices):
                    return list(zip(indices, samples))
                return [
                    (
                        indices[0],
                        LoadFailure(
                            f"the dataset's __getitems__ returned {len(samples)} samples for the "
                            f"{len(indices)} indices {indices[0]} to {indices[-1]}; it must "
                            "return one sample per index",
                            raised=False,
                        ),
                    )
                ]
        loaded = []
        for index in indices:
            try:
                loaded.append((index, self.dataset[index]))
            except Exception as exc:
                loaded.append((index, LoadFailure.of(exc)))
        if batched is not None and not any(isinstance(s, LoadFailure) for _, s in loaded):
            return [
                (
                    indices[0],
                    LoadFailure(
                        f"the dataset's __getitems__ raised {batched} for the indices "
                        f"{indices[0]} to {indices[-1]}, though __getitem__ loads each of them",
                        raised=False,
                    ),
                )
            ]
        return loaded

    def __getattr__(self, name: str) -> Any:
        # worker_init_fn and __iter__ code may read get_worker_info().dataset.<attribute>
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # ... and set one there: a handle opened per worker
        setattr(self.dataset, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.dataset, name)

    def __getstate__(self) -> Dict[str, Any]:
        return {"dataset": self.dataset}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        object.__setattr__(self, "dataset", state["dataset"])


# -- a split: its plan, its probes, its scan ------------------------------------------------
@dataclass
class Probe:
    """One sample loaded in the main process (a copy of its input, not the sample, which may
    share the memory of the whole dataset)."""

    failure: Optional[LoadFailure] = None
    input: Optional[Input] = None
    input_problem: Optional[InputProblem] = None
    hash: Optional[bytes] = None
    constant: bool = False
    #: for a ContractError about target_key: whether the sample lacks it, what the sample
    #: holds, and a key that looks like the target's
    target_missing: bool = False
    structure: str = ""
    target_key_hint: Any = None
    #: when the target is a container holding the class labels: their path
    labels_inside: Any = None


def structure(sample: Any) -> str:
    """What a sample holds, for messages: "its elements: ['image', 'label']"."""
    fields = _fields(sample)
    if isinstance(sample, torch.Tensor):
        return "it is a bare tensor"
    if fields is None:
        return f"it is {_kind(sample)}"
    return f"its elements: {[k for k, _ in fields]}"


@dataclass
class Registered:
    """The first sample with some hash, and how many samples have it; of a stream, also how
    many each worker read, and whether all were read at the same place of each worker's
    sequence (the n-th sample of each)."""

    position: Position
    label: Optional[Hashable]  # the target's key (Target.key)
    count: int = 1
    workers: Optional["collections.Counter[int]"] = None
    aligned: bool = True


#: The chance below which the repeats across a stream's workers are not taken for the
#: stream's own duplicates.
REPEAT_SIGNIFICANCE = 1e-3
#: The duplicate groups of a stream that the test of repeats across workers looks at.
REPEAT_GROUPS = 2000


@dataclass
class Repeats:
    """How a stream's inputs that occur more than once are spread over the workers.

    A *spread* input was read by several workers, once by each: what a stream gives when
    every worker reads the same records. A stream sharded by worker gives spread inputs
    only from its own duplicates, about as often as chance places equal records in
    different shards; ``chance`` is the probability of seeing this many spread inputs (or,
    ``aligned``, this many at the same place of each worker's sequence) if they were.
    """

    groups: int = 0
    spread: int = 0
    aligned: int = 0
    expected: float = 0.0
    chance: float = 1.0
    example: Optional[Tuple[Position, Position]] = None

    @property
    def found(self) -> bool:
        return self.chance < REPEAT_SIGNIFICANCE


def _spread_chances(fractions: Sequence[float], largest: int) -> List[float]:
    """For c = 0..largest: the chance that c samples, each read by worker w with
    probability fractions[w], were read by c different workers (c! e_c(fractions))."""
    symmetric = [1.0] + [0.0] * largest
    for fraction in fractions:
        for c in range(largest, 0, -1):
            symmetric[c] += symmetric[c - 1] * fraction
    return [math.factorial(c) * value for c, value in enumerate(symmetric)]


def _upper_tail(chances: Sequence[float], observed: int) -> float:
    """P(X >= observed) for X the number of successes of independent trials."""
    if observed <= 0:
        return 1.0
    distribution = np.zeros(len(chances) + 1)
    distribution[0] = 1.0
    for n, chance in enumerate(chances):
        shifted = distribution[: n + 1] * chance
        distribution[: n + 2] *= 1.0 - chance
        distribution[1 : n + 2] += shifted
    return float(distribution[observed:].sum())


@dataclass
class Scan:
    """What the pass with worker processes saw, merged over the batches."""

    count: int = 0
    complete: bool = False  # the whole split (or its max_samples subset) was read
    loader_error: Optional[str] = None
    timed_out: bool = False
    worker_died: bool = False
    in_flight: str = ""
    failures: List[Tuple[Position, LoadFailure]] = field(default_factory=list)
    failure_count: int = 0
    input_problems: List[Tuple[Position, InputProblem]] = field(default_factory=list)
    input_problem_count: int = 0
    shapes: Dict[Tuple[Path, Tuple[int, ...]], List[Any]] = field(default_factory=dict)
    tensors: int = 0
    low: Extreme = field(default_factory=lambda: Extreme(float("inf")))
    high: Extreme = field(default_factory=lambda: Extreme(float("-inf")))
    float_eps: float = 0.0
    nonfinite: List[Position] = field(default_factory=list)
    nonfinite_count: int = 0
    #: per value of the targets: the samples whose target holds it (a class present in a
    #: label map counts once for that sample), its elements, the first sample holding it
    labels: "collections.Counter[int]" = field(default_factory=collections.Counter)
    elements: "collections.Counter[int]" = field(default_factory=collections.Counter)
    first_with_label: Dict[int, Position] = field(default_factory=dict)
    labelled: int = 0
    #: the shapes of the targets: shape -> [count, the first positions]
    target_shapes: Dict[Tuple[int, ...], List[Any]] = field(default_factory=dict)
    #: the first one-element target (shape (1,)), and where
    one_element: Optional[Tuple[Position, Target]] = None
    #: the first batch of several samples whose targets collate_fn put in one tensor:
    #: (samples, the tensor's shape)
    target_batch: Optional[Tuple[int, Tuple[int, ...]]] = None
    unlabelled: List[Position] = field(default_factory=list)
    unlabelled_count: int = 0
    target_problems: List[Tuple[Position, str]] = field(default_factory=list)
    target_problem_count: int = 0
    #: hash -> the first sample with it (deterministic splits and streams only); inputs
    #: whose values are all equal (silence, blank images) are only counted
    hashes: Dict[bytes, Registered] = field(default_factory=dict)
    constant_hashes: Set[bytes] = field(default_factory=set)
    constant_count: int = 0
    conflicts: List[Tuple[Registered, Position, Target]] = field(default_factory=list)
    conflict_count: int = 0
    #: streams: the hashed (not constant) samples each worker read, and the inputs read
    #: more than once (the first REPEAT_GROUPS of them)
    per_worker: "collections.Counter[int]" = field(default_factory=collections.Counter)
    groups: List[Registered] = field(default_factory=list)
    example: Optional[Tuple[Position, Position]] = None
    pids: Dict[int, int] = field(default_factory=dict)  # worker process id -> worker id
    kept: Dict[Position, Input] = field(default_factory=dict)
    collate_error: Optional[str] = None
    collate_shapes: List[Tuple[Path, Tuple[int, ...]]] = field(default_factory=list)
    collate_at: str = ""

    @property
    def blocked(self) -> bool:
        return bool(self.loader_error or self.failures or self.input_problems)

    @property
    def nested(self) -> bool:
        """Whether the inputs are nested (several tensors each)."""
        return any(path for path, _ in self.shapes)

    def add(self, report: BatchReport) -> None:
        """Merge one batch's report (in the order the batches come)."""
        if report.internal_error:
            raise RuntimeError(
                f"dltestkit failed while inspecting a batch in a DataLoader "
                f"worker (a bug of dltestkit):\n{report.internal_error}"
            )
        self.pids[report.pid] = report.worker
        self.count += len(report.positions)
        self.failure_count += len(report.failures)
        self.failures += report.failures[: SHOWN - len(self.failures)]
        self.input_problem_count += len(report.input_problems)
        self.input_problems += report.input_problems[: SHOWN - len(self.input_problems)]
        for key, (count, positions) in report.shapes.items():
            seen = self.shapes.setdefault(key, [0, []])
            seen[0] += count
            seen[1] += positions[: SHOWN - len(seen[1])]
        self.tensors += report.tensors
        if report.low.value < self.low.value:
            self.low = report.low
        if report.high.value > self.high.value:
            self.high = report.high
        self.float_eps = max(self.float_eps, report.float_eps)
        self.nonfinite_count += len(report.nonfinite)
        self.nonfinite += report.nonfinite[: SHOWN - len(self.nonfinite)]
        self.target_problem_count += len(report.target_problems)
        self.target_problems += report.target_problems[: SHOWN - len(self.target_problems)]
        self.unlabelled_count += report.unlabelled_count
        self.unlabelled += report.unlabelled[: SHOWN - len(self.unlabelled)]
        for position, hashed, target, constant in report.samples:
            if target is not None:
                self._count(position, target)
            if hashed is None:
                continue
            if constant:
                self.constant_count += 1
                self.constant_hashes.add(hashed)
            else:
                self._register(position, hashed, target, report.worker)
        if (
            self.target_batch is None
            and report.batched_target is not None
            and len(report.positions) > 1
        ):
            self.target_batch = (len(report.positions), report.batched_target)
        self.kept.update(
            (position, tuple((path, tensor.clone()) for path, tensor in value))
            for position, value in report.kept.items()
        )
        if report.collate_error and self.collate_error is None:
            self.collate_error = report.collate_error
            self.collate_shapes = list(report.shapes)
            self.collate_at = _span(report.positions)

    def _count(self, position: Position, target: Union[int, Target]) -> None:
        self.labelled += 1
        if isinstance(target, int):  # a plain label, the common case: counted directly
            self.labels[target] += 1
            self.elements[target] += 1
            self.first_with_label.setdefault(target, position)
            seen = self.target_shapes.setdefault((), [0, []])
            seen[0] += 1
            if len(seen[1]) < SHOWN:
                seen[1].append(position)
            return
        for value, elements in target.values:
            self.labels[value] += 1
            self.elements[value] += elements
            self.first_with_label.setdefault(value, position)
        seen = self.target_shapes.setdefault(target.shape, [0, []])
        seen[0] += 1
        if len(seen[1]) < SHOWN:
            seen[1].append(position)
        if target.shape == (1,) and self.one_element is None:
            self.one_element = (position, target)

    def _register(
        self, position: Position, hashed: bytes, target: Union[int, Target, None], worker: int
    ) -> None:
        stream = isinstance(position, tuple)
        if stream:
            self.per_worker[worker] += 1
        first = self.hashes.get(hashed)
        label = target.key if isinstance(target, Target) else target
        if first is None:
            self.hashes[hashed] = Registered(position, label)
            return
        first.count += 1
        if first.label is not None and label is not None and label != first.label:
            self.conflict_count += 1
            if len(self.conflicts) < SHOWN:
                self.conflicts.append((first, position, as_target(target)))
        if stream and isinstance(first.position, tuple) and isinstance(position, tuple):
            if first.workers is None:
                first.workers = collections.Counter({first.position[0]: 1})
                if len(self.groups) < REPEAT_GROUPS:
                    self.groups.append(first)
            first.workers[worker] += 1
            first.aligned = first.aligned and position[1] == first.position[1]
            if self.example is None and first.position[0] != worker:
                self.example = (first.position, position)

    def repeats(self) -> Repeats:
        """Whether a stream's workers read the same records: its inputs that occur more than
        once, tested against the stream's own duplicates placed in the workers' shards by
        chance. Inputs whose values are all equal are left out."""
        found = Repeats(groups=len(self.groups), example=self.example)
        total = sum(self.per_worker.values())
        if len(self.per_worker) < 2 or not self.groups:
            return found
        fractions = [count / total for count in self.per_worker.values()]
        smallest = min(self.per_worker.values())
        by_size = _spread_chances(fractions, len(fractions))
        spread, aligned = [], []
        for group in self.groups:
            workers = group.workers or collections.Counter()
            size = sum(workers.values())
            chance = by_size[size] if size < len(by_size) else 0.0
            hit = max(workers.values()) == 1
            spread.append(chance)
            # the same place in each worker's sequence: about 1 in `smallest` for each more
            aligned.append(chance * smallest ** (1 - size))
            found.spread += hit
            found.aligned += hit and group.aligned
        found.expected = sum(spread)
        if found.spread >= 3:
            # two tests: each at half the significance
            found.chance = 2 * min(
                _upper_tail(spread, found.spread), _upper_tail(aligned, found.aligned)
            )
        return found


def _span(positions: Sequence[Position]) -> str:
    """The positions of a batch: "indices 16 to 31", "samples 0 to 15 of worker 1"."""
    if not positions:
        return "no sample"
    first, last = positions[0], positions[-1]
    if isinstance(first, tuple) and isinstance(last, tuple):
        return f"samples {first[1]} to {last[1]} of worker {first[0]}"
    return f"index {first}" if first == last else f"indices {first} to {last}"


@dataclass
class Loading:
    """How the checks load a split; every field changes what the scan sees."""

    input_key: Any
    target_key: Any
    collate_fn: Callable[[List[Any]], Any]
    worker_init_fn: Optional[Callable[[int], None]]
    batch_size: int
    num_workers: int
    max_samples: Optional[int]
    probe_count: int
    seed: int
    augmented: bool
    timeout: float
    multiprocessing_context: Optional[str]

    def key(self) -> Tuple[Hashable, ...]:
        values = (getattr(self, option.name) for option in dataclasses.fields(self))
        return tuple(callable_key(v) if callable(v) else v for v in values)


#: A worker that exited: "DataLoader worker (pid(s) 123, 456) exited unexpectedly".
_DEAD_WORKER = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)")


class SplitState:
    """One split as the checks of a test class know it: loaded lazily, at most once.

    ``dataset`` is the split of the test that is running (set by ``use``); it is released
    after each test, so that the cache does not keep a dataset alive.
    """

    def __init__(self, dataset: Any, loading: Loading) -> None:
        self.dataset: Any = dataset
        self.loading = loading
        self.stream = is_stream(dataset)
        self.size = sized(dataset)
        generator = torch.Generator().manual_seed(loading.seed)
        self.indices: Sequence[int] = range(0)
        if self.stream:
            self.probe_positions: List[Position] = [(-1, n) for n in range(loading.probe_count)]
        else:
            size = self.size or 0
            if loading.max_samples is not None and loading.max_samples < size:
                self.indices = sorted(
                    torch.randperm(size, generator=generator)[: loading.max_samples].tolist()
                )
            else:
                self.indices = range(size)
            probes = [self.indices[0], self.indices[-1]] if len(self.indices) else []
            extra = torch.randperm(len(self.indices), generator=generator).tolist()
            probes += [self.indices[i] for i in extra if self.indices[i] not in probes]
            self.probe_positions = sorted(set(probes[: loading.probe_count]))
        self.dataset = None  # until ``use``
        self._probes: Optional[Dict[Position, Probe]] = None
        self._scan: Optional[Scan] = None
        self._reloaded: Optional[Dict[Position, Probe]] = None
        self._loads_in_main: Dict[Position, bool] = {}
        #: why the split could not be copied by pickling (a spawned worker fails the same
        #: way), when pickling worked but unpickling did not
        self.unpickling_error: Optional[str] = None

    def use(self, dataset: Any) -> bool:
        """Load from ``dataset`` (the running test's split); True if it was not in use."""
        fresh = self.dataset is not dataset
        self.dataset = dataset
        return fresh

    def release(self) -> None:
        self.dataset = None

    # -- the main process -----------------------------------------------------------------
    @property
    def probes(self) -> Dict[Position, Probe]:
        if self._probes is None:
            self._probes = self._load_probes(self.probe_positions, self.loading.seed)
        return self._probes

    @contextlib.contextmanager
    def _main_process(self) -> Iterator[MainProcess]:
        """Where the main process loads from: a copy of the split, made as a spawned worker
        would unpickle it (the tensors and arrays shared, not copied), so that nothing the
        split opens lazily is opened in the split itself before the scan's workers fork.
        A split that cannot be copied is loaded itself, after the scan."""
        timeout = self.loading.timeout
        pickled = Pickled.of(self.dataset)
        main = MainProcess(timeout, pickled=pickled) if pickled is not None else None
        if main is not None and main.copy_error is not None:
            self.unpickling_error = main.copy_error
            main.close()
            main = None
        if main is None:
            self.scan  # noqa: B018 (the workers start before the main process loads)
            main = MainProcess(timeout, source=self.dataset)
        try:
            yield main
        finally:
            main.close()

    def _load(self, main: MainProcess, function: Callable[[Any], Any]) -> Any:
        """``function(source)`` in the main process: the sample, or a LoadFailure."""
        try:
            return main.call(lambda: function(main.source))
        except TimedOut:
            return LoadFailure(
                f"did not finish within loader_timeout={self.loading.timeout:g} s",
                timed_out=True,
            )
        except Exception as exc:
            if main.source is self.dataset and main.source is not None:
                # the split itself (it could not be copied): it may hold a handle bound to
                # the main thread (an SQLite connection); try there once more
                try:
                    return function(main.source)
                except Exception as again:
                    forget(exc)
                    exc = again
            failure = LoadFailure.of(exc)
            forget(exc)
            return failure

    def _load_probes(self, positions: List[Position], seed: int) -> Dict[Position, Probe]:
        """Load samples one by one in the main process, the global RNGs seeded and restored;
        after a load that timed out, the later positions are left out."""
        loaded: Dict[Position, Any] = {}
        with preserved_global_state():
            make_deterministic(seed)
            with self._main_process() as main:
                if self.stream:
                    loaded = self._read_stream(main, len(positions))
                else:
                    for index in positions:
                        loaded[index] = self._load(main, operator.itemgetter(index))
                        if isinstance(loaded[index], LoadFailure) and loaded[index].timed_out:
                            break
        return {position: self._probe(sample) for position, sample in loaded.items()}

    def _read_stream(self, main: MainProcess, count: int) -> Dict[Position, Any]:
        read: Dict[Position, Any] = {}
        iterator: List[Any] = []
        started = self._load(main, lambda source: iterator.append(iter(source)))
        if isinstance(started, LoadFailure):
            return {(-1, 0): started}
        for number in range(count):
            sample = self._load(main, lambda _: next(iterator[0], _END))
            if sample is _END:
                break
            read[(-1, number)] = sample
            if isinstance(sample, LoadFailure):
                break
        close = getattr(iterator[0], "close", None)
        if close is not None and not main.stuck:
            self._load(main, lambda _: close())
        return read

    def _probe(self, sample: Any) -> Probe:
        if isinstance(sample, LoadFailure):
            return Probe(failure=sample)
        probe = Probe(
            target_missing=pick_target(sample, self.loading.target_key)[1] is MISSING,
            structure=structure(sample),
            target_key_hint=target_key_of(sample),
            labels_inside=labels_inside(sample, self.loading.target_key),
        )
        picked = pick_input(sample, self.loading.input_key)
        if isinstance(picked, InputProblem):
            probe.input_problem = picked
        else:
            probe.input = tuple((path, tensor.detach().clone()) for path, tensor in picked)
            probe.hash, probe.constant = input_digest(picked), is_constant(picked)
        return probe

    def reloaded(self, positions: List[Position]) -> Dict[Position, Probe]:
        """The probes at ``positions`` loaded once more in the main process, under another
        seed: tells random data from data that depends on the process. Only used when a
        check is failing."""
        if self._reloaded is None:
            self._reloaded = self._load_probes(
                [p for p in positions if isinstance(p, int)], derived_seed(self.loading.seed, 1)
            )
        return self._reloaded

    def loads_in_main_process(self, position: Position) -> bool:
        """Whether the sample at ``position`` loads in the main process: its probe, or (an
        index that is not one) loaded now, once for every check that asks. Only asked when the
        workers failed on it."""
        if position not in self._loads_in_main:
            probe = self.probes.get(position)
            if probe is None and isinstance(position, int):
                probe = self._load_probes([position], self.loading.seed).get(position)
            self._loads_in_main[position] = probe is not None and probe.failure is None
        return self._loads_in_main[position]

    def load_again(self, indices: List[int]) -> Dict[int, Input]:
        """The inputs of some samples, loaded in the main process (to confirm a match
        exactly); those that fail to load are left out."""
        probes = self._load_probes(sorted(set(indices)), self.loading.seed)
        return {
            index: probe.input
            for index, probe in probes.items()
            if isinstance(index, int) and probe.input is not None
        }

    @property
    def probe_timed_out(self) -> bool:
        """Whether loading a probe in the main process timed out."""
        return any(p.failure is not None and p.failure.timed_out for p in self.probes.values())

    # -- the scan with worker processes -------------------------------------------------------
    @property
    def scan(self) -> Scan:
        if self._scan is None:
            self._scan = self._run_scan()
        return self._scan

    def _run_scan(self) -> Scan:
        loading = self.loading
        inspection = Inspection(
            loading.input_key,
            loading.target_key,
            loading.collate_fn,
            frozenset(self.probe_positions) if not self.stream else frozenset(),
            hash_inputs=not loading.augmented,
            stream=self.stream,
        )
        if self.stream:
            dataset, sampler = self.dataset, None
        else:
            dataset, sampler = Indexed(self.dataset), self.indices
        loader = DataLoader(
            dataset,
            batch_size=loading.batch_size,
            sampler=sampler,
            num_workers=loading.num_workers,
            collate_fn=Inspector(inspection),
            timeout=loading.timeout,
            worker_init_fn=loading.worker_init_fn,
            multiprocessing_context=loading.multiprocessing_context,
            generator=torch.Generator().manual_seed(loading.seed),
        )
        scan = Scan()
        limit = loading.max_samples if self.stream else None
        batches = 0
        iterator = None
        with warnings.catch_warnings():
            # the DataLoader's own warnings (a stream whose len() is wrong, a dataset that
            # cannot be pickled for the workers) are what test_data_loading reports
            warnings.filterwarnings("ignore", module=r"torch\.utils\.data\.dataloader")
            try:
                iterator = iter(loader)
                while True:
                    try:
                        report = next(iterator)
                    except StopIteration:
                        scan.complete = True
                        break
                    except Exception as exc:
                        self._loader_failed(scan, exc, batches)
                        forget(exc)
                        break
                    batches += 1
                    scan.add(report)
                    if scan.blocked or (limit is not None and scan.count >= limit):
                        scan.complete = (
                            not scan.blocked and self.size is not None and scan.count >= self.size
                        )
                        break
            except Exception as exc:  # iter(loader) failed: the workers did not start
                if iterator is not None:
                    raise
                self._loader_failed(scan, exc, batches)
                forget(exc)
            finally:
                del iterator  # shuts the workers down now (nothing else refers to it)
        return scan

    def _loader_failed(self, scan: Scan, exc: BaseException, batches: int) -> None:
        message = str(exc)
        scan.timed_out = message.startswith("DataLoader timed out")
        if "Original Traceback" in message:  # an exception in a worker, with its traceback
            lines = [line for line in message.strip().splitlines() if line.strip()]
            text = f"{lines[0].strip()} {lines[-1].strip()}"
        else:
            text = exception_text(exc)
        scan.loader_error = text
        if self.stream:
            scan.in_flight = f"after {scan.count} samples had arrived"
            return
        size, workers = self.loading.batch_size, self.loading.num_workers
        total = -(-len(self.indices) // size)

        def batch(number: int) -> str:
            return _span(list(self.indices[number * size : (number + 1) * size]))

        dead = _DEAD_WORKER.search(message)
        # a worker that exits while it sends a batch breaks the pipe instead
        if dead is None and not isinstance(exc, (ConnectionError, EOFError)):
            # the batch the DataLoader waited for: the oldest one its worker had not sent
            scan.in_flight = f"{batch(batches)} (batch {batches + 1} of {total})"
            return
        # A worker exited while loading one of the batches sent to it that had not arrived
        # (the DataLoader sends batch n to worker n % num_workers, two per worker ahead).
        scan.worker_died = True
        ahead = range(batches, min(batches + 2 * workers, total))
        found = dead.group(1).replace(" ", "").split(",") if dead is not None else []
        pids = [int(pid) for pid in found if pid]
        known = sorted({scan.pids[pid] for pid in pids if pid in scan.pids})
        if known:
            scan.in_flight = (
                f"one of the batches sent to worker {', '.join(map(str, known))}: "
                + ", ".join(
                    f"{batch(n)} (batch {n + 1} of {total})" for n in ahead if n % workers in known
                )
            )
        else:
            scan.in_flight = (
                f"one of the batches in flight: {', '.join(batch(n) for n in ahead)} "
                f"(batches {ahead.start + 1} to {ahead.stop} of {total})"
            )


#: What _read_stream's next() gives at the end of a stream.
_END: Any = object()


# -- the cache ---------------------------------------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary[type, Dict[Tuple[Hashable, ...], SplitState]]" = (
    weakref.WeakKeyDictionary()
)


def split_state(owner: type, name: str, dataset: Any, loading: Loading) -> SplitState:
    """The cached state of a split for the test class ``owner``. The cache of a class is
    dropped by a class cleanup (when the runner has run the class's tests) or with the
    class; it is keyed by the split's name and type and by every loading option."""
    cache = _CACHE.get(owner)
    if cache is None:
        cache = _CACHE[owner] = {}
        add_cleanup = getattr(owner, "addClassCleanup", None)
        if add_cleanup is not None:
            add_cleanup(_CACHE.pop, owner, None)
    key = (
        name,
        type(dataset).__module__,
        type(dataset).__qualname__,
        sized(dataset),
        *loading.key(),
    )
    if key not in cache:
        cache[key] = SplitState(dataset, loading)
    return cache[key]


def cached_classes() -> List[type]:
    """The test classes that hold cached scans (for tests of the cache's lifetime)."""
    return list(_CACHE.keys())
