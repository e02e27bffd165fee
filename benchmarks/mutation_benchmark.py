"""Mutation benchmark: how many bugs of real model code the checks catch.

    python benchmarks/mutation_benchmark.py                 # the full run (under 30 min, 2 cores)
    python benchmarks/mutation_benchmark.py --quick         # 4 mutants a model, a minute or two
    python benchmarks/mutation_benchmark.py --models qwen2,lstm --per-model 20 --json out.json

Each *mutant* is one small mechanical change of the installed source of a real model, made in
memory at run time (site-packages is never edited): an arithmetic operator swapped, a comparison
or a boolean operator changed, a negation or a ``not`` removed, a number, a dimension or a flag
changed, a statement removed, a call replaced by its argument (an activation, a normalisation,
a layer skipped), two arguments swapped (query and key). Only code that runs in the model's
forward and backward passes on the test's inputs is mutated: the lines a trace of the original
model's eval and training passes goes through. The mutated function is compiled from the
changed syntax tree into the module's namespace (with its decorators) and put in the place of
the original for the mutant's run only.

For each mutant, the original weights are loaded into a model built from the mutated code and
its eval- and training-mode outputs and gradients are compared with the original's. Mutants
that fail to build, that raise or hang on the inputs, and *equivalent* mutants (outputs and
gradients bit-identical to the original's) are left out of the rates. On every other one, the
benchmark runs

- the default checks, with the setUp the docs show for that kind of model (``ModelTests`` or
  ``SequenceModelTests``), stopping at the first that fails or errors;
- separately, the reference checks as docs/references.md sets them up: ``test_reference_outputs``
  against a reference file written from the original model (``reference_gradients = True``).

With ``--pytest-torch`` (pytest-torch installed), it also runs pytest-torch's four default checks
(benchmarks/compare_pytest_torch.py: the inference contract, invariance, a checkpoint round trip,
finite gradients) on each mutant, leaving out those that already fail on the original model.

A mutant is *killed* by a set of checks when one of them fails or errors. It prints the kill rate
per model and per operator (default checks; default and reference checks together), which check
killed how many, and the mutants that survive. Models: T5, Qwen2, DistilBERT (transformers, eager
attention), ConvNeXt, Swin, EfficientNet (timm), nn.TransformerEncoderLayer with
nn.MultiheadAttention, nn.LSTM (torch). Mutants are sampled per model with a fixed seed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import importlib
import inspect
import json
import multiprocessing.util
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import unittest
import unittest.mock
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dltestkit.core.references import CI_VARIABLES, WRITE_VARIABLE  # noqa: E402

BATCH, LENGTH, VOCAB = 4, 8, 100


# == the models ===============================================================================
def token_batch(left_padding: bool = False) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if left_padding:
        mask[0, :3], mask[1, :1] = 0, 0
    else:
        mask[0, -3:], mask[1, -1:] = 0, 0
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=generator)
    return {"input_ids": ids, "attention_mask": mask}


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def t5() -> nn.Module:
    from transformers import T5Config, T5Model

    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return T5Model(config)


def t5_inputs() -> Dict[str, torch.Tensor]:
    batch = token_batch()
    return {**batch, "decoder_input_ids": batch["input_ids"].flip(1)}


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return Qwen2ForCausalLM(config)


def left_padded() -> Dict[str, torch.Tensor]:
    batch = token_batch(left_padding=True)
    mask = batch["attention_mask"]
    return {**batch, "position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}


def distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
    )
    config._attn_implementation = "eager"
    return DistilBertModel(config)


def convnext() -> nn.Module:
    import timm

    model: nn.Module = timm.create_model(
        "convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=10
    )
    return model


def swin() -> nn.Module:
    import timm

    model: nn.Module = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
        window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10,
    )  # fmt: skip
    return model


def efficientnet() -> nn.Module:
    import timm

    model: nn.Module = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    return model


def encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)


def encoder_inputs() -> Dict[str, Any]:
    src = torch.randn(BATCH, LENGTH, 16, generator=torch.Generator().manual_seed(1))
    return {"src": src, "src_mask": nn.Transformer.generate_square_subsequent_mask(LENGTH),
            "is_causal": True}  # fmt: skip


def lstm() -> nn.Module:
    return nn.LSTM(3, 5, num_layers=2, batch_first=True)


def lstm_inputs() -> torch.Tensor:
    return torch.randn(BATCH, LENGTH, 3, generator=torch.Generator().manual_seed(1))


@dataclass
class Target:
    """A model, the modules whose code is mutated, and the setUp the docs show for it."""

    label: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    #: module name -> the functions or classes (qualname prefixes) mutated there; () for all
    sources: Dict[str, Tuple[str, ...]]
    sequence: bool = False
    options: Dict[str, Any] = field(default_factory=dict)


TARGETS: Dict[str, Target] = {
    "t5": Target(
        "T5 (encoder-decoder)", t5, t5_inputs,
        {"transformers.models.t5.modeling_t5": ()}, sequence=True,
        options=dict(expected_output_shape=(BATCH, LENGTH, 32), sequence_dim=1, causal=True,
                     sequence_inputs=["decoder_input_ids"]),
    ),
    "qwen2": Target(
        "Qwen2 (causal LM)", qwen2, left_padded,
        {"transformers.models.qwen2.modeling_qwen2": ()}, sequence=True,
        options=dict(expected_output_shape=(BATCH, LENGTH, VOCAB), sequence_dim=1, causal=True,
                     padding_mask="attention_mask"),
    ),
    "distilbert": Target(
        "DistilBERT", distilbert, token_batch,
        {"transformers.models.distilbert.modeling_distilbert": ()}, sequence=True,
        options=dict(expected_output_shape=(BATCH, LENGTH, 32), sequence_dim=1,
                     padding_mask="attention_mask"),
    ),
    "convnext": Target(
        "ConvNeXt (timm)", convnext, images, {"timm.models.convnext": ()},
        options=dict(expected_output_shape=(BATCH, 10)),
    ),
    "swin": Target(
        "Swin (timm)", swin, images, {"timm.models.swin_transformer": ()},
        options=dict(expected_output_shape=(BATCH, 10)),
    ),
    "efficientnet": Target(
        "EfficientNet (timm)", efficientnet, images,
        {"timm.models.efficientnet": (), "timm.models._efficientnet_blocks": ()},
        options=dict(expected_output_shape=(BATCH, 10)),
    ),
    "encoder": Target(
        "nn.TransformerEncoderLayer + nn.MultiheadAttention", encoder_layer, encoder_inputs,
        {
            "torch.nn.modules.transformer": ("TransformerEncoderLayer", "_get_seq_len",
                                             "_detect_is_causal_mask"),
            "torch.nn.modules.activation": ("MultiheadAttention",),
            "torch.nn.functional": ("multi_head_attention_forward", "_in_projection_packed",
                                    "_mha_shape_check", "_canonical_mask", "_none_or_dtype"),
        }, sequence=True,
        options=dict(expected_output_shape=(BATCH, LENGTH, 16), sequence_dim=1, causal=True,
                     unbatched_inputs=["src_mask"]),
    ),
    "lstm": Target(
        "nn.LSTM", lstm, lstm_inputs,
        {"torch.nn.modules.rnn": ("RNNBase", "LSTM")}, sequence=True,
        options=dict(expected_output_shape=(BATCH, LENGTH, 5), sequence_dim=1, causal=True),
    ),
}  # fmt: skip


# == mutation sites ===========================================================================
_ARITHMETIC = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
               ast.FloorDiv: ast.Mult, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}  # fmt: skip
_COMPARISON = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
               ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
               ast.In: ast.NotIn, ast.NotIn: ast.In}  # fmt: skip
_MODULES = {"torch", "F", "nn", "math", "np", "functional", "_VF", "init"}
_DIM_KEYWORDS = {"dim", "dims", "axis", "start_dim", "end_dim", "dim0", "dim1"}
_DIM_METHODS = {"transpose", "permute", "unsqueeze", "squeeze", "flatten", "size", "movedim",
                "softmax", "log_softmax", "mean", "sum", "amax", "cumsum", "roll"}  # fmt: skip
_QUIET = ("warn", "log", "logger", "warning", "deprecat")
OPERATORS = ("arithmetic", "comparison", "boolean", "negation", "constant", "dimension", "flag",
             "statement", "call", "swap")  # fmt: skip


@dataclass(frozen=True)
class Site:
    """One mutation: the ``variant``-th change of the node at ``position`` (in ast.walk order)
    of function ``function`` of module ``module``."""

    target: str
    module: str
    function: str
    position: int
    variant: int
    operator: str
    line: int
    description: str


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _excluded(function: ast.FunctionDef) -> Set[int]:
    """ids of nodes no mutation touches: the docstring, assertions and raises, messages,
    logging and warnings, annotations."""
    out: Set[int] = set()
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        out.update(id(n) for n in ast.walk(body[0]))
    for node in ast.walk(function):
        quiet = isinstance(node, ast.Call) and any(w in _call_name(node).lower() for w in _QUIET)
        if isinstance(node, (ast.Assert, ast.Raise, ast.JoinedStr)) or quiet:
            out.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.AnnAssign):
            out.update(id(n) for n in ast.walk(node.annotation))
    for part in (function.args, function.returns, *function.decorator_list):
        if part is not None:
            out.update(id(n) for n in ast.walk(part))
    return out


def _parents(tree: ast.AST) -> Dict[int, Tuple[ast.AST, str, Optional[int]]]:
    found: Dict[int, Tuple[ast.AST, str, Optional[int]]] = {}
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if isinstance(value, ast.AST):
                found[id(value)] = (parent, name, None)
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        found[id(item)] = (parent, name, index)
    return found


def _is_dimension(node: ast.AST, parents: Dict[int, Tuple[ast.AST, str, Optional[int]]]) -> bool:
    parent, name, _ = parents.get(id(node), (None, "", None))
    if isinstance(parent, ast.UnaryOp):
        return _is_dimension(parent, parents)
    if isinstance(parent, ast.keyword):
        return parent.arg in _DIM_KEYWORDS
    return isinstance(parent, ast.Call) and name == "args" and _call_name(parent) in _DIM_METHODS


def _variants(
    node: ast.AST, parents: Dict[int, Tuple[ast.AST, str, Optional[int]]]
) -> List[Tuple[str, Callable[[ast.AST], ast.AST]]]:
    """The changes of ``node``: (operator, a function from a copy of the node to what
    replaces it)."""
    out: List[Tuple[str, Callable[[ast.AST], ast.AST]]] = []

    def swapped_op(attribute: str, table: Dict[type, type]) -> Callable[[ast.AST], ast.AST]:
        def change(copy_: ast.AST) -> ast.AST:
            setattr(copy_, attribute, table[type(getattr(copy_, attribute))]())
            return copy_

        return change

    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _ARITHMETIC:
        out.append(("arithmetic", swapped_op("op", _ARITHMETIC)))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARISON:

        def compared(copy_: ast.AST) -> ast.AST:
            assert isinstance(copy_, ast.Compare)
            copy_.ops = [_COMPARISON[type(copy_.ops[0])]()]
            return copy_

        out.append(("comparison", compared))
    if isinstance(node, ast.BoolOp):

        def flipped(copy_: ast.AST) -> ast.AST:
            assert isinstance(copy_, ast.BoolOp)
            copy_.op = ast.Or() if isinstance(copy_.op, ast.And) else ast.And()
            return copy_

        out.append(("boolean", flipped))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("boolean", lambda copy_: copy_.operand))  # type: ignore[attr-defined]
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and not isinstance(node.operand, ast.Constant)
    ):
        out.append(("negation", lambda copy_: copy_.operand))  # type: ignore[attr-defined]
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float)):
        value = node.value
        if isinstance(value, bool):
            out.append(("flag", lambda copy_: ast.Constant(not value)))
        elif isinstance(value, int):
            kind = "dimension" if _is_dimension(node, parents) else "constant"
            out.append((kind, lambda copy_: ast.Constant(value + 1)))
        else:
            out.append(("constant", lambda copy_: ast.Constant(value * 2 if value else 1.0)))
    if isinstance(node, ast.Call):
        positional = [a for a in node.args if not isinstance(a, ast.Starred)]
        func = node.func
        method_of_value = (
            isinstance(func, ast.Attribute)
            and not (isinstance(func.value, ast.Name) and func.value.id in _MODULES | {"self"})
            and not isinstance(func.value, ast.Attribute)
        )
        if method_of_value:
            out.append(("call", lambda copy_: copy_.func.value))  # type: ignore[attr-defined]
        elif positional and len(positional) == len(node.args):
            out.append(("call", lambda copy_: copy_.args[0]))  # type: ignore[attr-defined]
        if len(positional) >= 2 and positional[:2] == node.args[:2]:
            first, second = node.args[0], node.args[1]
            if not (isinstance(first, ast.Constant) and isinstance(second, ast.Constant)):

                def swapped(copy_: ast.AST) -> ast.AST:
                    assert isinstance(copy_, ast.Call)
                    copy_.args[0], copy_.args[1] = copy_.args[1], copy_.args[0]
                    return copy_

                out.append(("swap", swapped))
    statement = isinstance(node, (ast.Assign, ast.AugAssign)) or (
        isinstance(node, ast.AnnAssign) and node.value is not None
    )
    in_a_body = parents.get(id(node), (None, "", None))[2] is not None  # in a list of statements
    if in_a_body and (statement or isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        out.append(("statement", lambda copy_: ast.copy_location(ast.Pass(), copy_)))
    return out


def functions_of(module: Any, prefixes: Sequence[str]) -> Dict[str, ast.FunctionDef]:
    """The module-level functions and the methods of module-level classes, by qualname
    (those whose qualname starts with one of ``prefixes``, when given)."""
    tree = ast.parse(Path(inspect.getsourcefile(module) or "").read_text(encoding="utf-8"))
    found: Dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    found[f"{node.name}.{item.name}"] = item
    if prefixes:
        found = {
            name: node
            for name, node in found.items()
            if any(name == p or name.startswith(p + ".") for p in prefixes)
        }
    return found


def sites_of(target_key: str, covered: Set[Tuple[str, int]]) -> List[Site]:
    """Every mutation of the target's code on a line its passes run."""
    target = TARGETS[target_key]
    sites = []
    for module_name, prefixes in target.sources.items():
        module = importlib.import_module(module_name)
        path = str(Path(inspect.getsourcefile(module) or "").resolve())
        for qualname, function in functions_of(module, prefixes).items():
            excluded = _excluded(function)
            parents = _parents(function)
            for position, node in enumerate(ast.walk(function)):
                line = getattr(node, "lineno", None)
                if id(node) in excluded or line is None or (path, line) not in covered:
                    continue
                for variant, (operator, change) in enumerate(_variants(node, parents)):
                    before = ast.unparse(node).split("\n")[0]
                    after = change(copy.deepcopy(node))
                    text = "removed" if isinstance(after, ast.Pass) else ast.unparse(after)
                    sites.append(
                        Site(
                            target_key,
                            module_name,
                            qualname,
                            position,
                            variant,
                            operator,
                            line,
                            f"{before[:70]}  ->  {text.splitlines()[0][:70]}",
                        )  # fmt: skip
                    )
    return sites


# == installing a mutant ======================================================================
def _compile(module: Any, qualname: str, function: ast.FunctionDef) -> Any:
    """``function`` compiled in ``module``'s namespace, its decorators applied, as the value
    to set on its class or module."""
    owner_name, _, name = qualname.rpartition(".")
    bare = copy.copy(function)
    bare.decorator_list = []
    body: ast.stmt = bare
    if owner_name:
        body = ast.ClassDef(name=owner_name, bases=[], keywords=[], body=[bare],
                            decorator_list=[])  # fmt: skip
        ast.copy_location(body, function)
    tree = ast.fix_missing_locations(ast.Module(body=[body], type_ignores=[]))
    namespace: Dict[str, Any] = {}
    exec(
        compile(tree, inspect.getsourcefile(module) or "<mutant>", "exec"), vars(module), namespace
    )
    raw = vars(namespace[owner_name])[name] if owner_name else namespace[name]
    code = getattr(raw, "__code__", None)
    if owner_name and code is not None and "__class__" in code.co_freevars:
        cell = raw.__closure__[code.co_freevars.index("__class__")]
        cell.cell_contents = getattr(module, owner_name)  # zero-argument super()
    value = raw
    for decorator in reversed(function.decorator_list):
        expression = ast.fix_missing_locations(ast.Expression(decorator))
        value = eval(compile(expression, "<decorator>", "eval"), vars(module))(value)
    return value


class Mutant:
    """A site's change, installed in its module for a ``with`` block."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.module = importlib.import_module(site.module)
        function = functions_of(self.module, ())[site.function]
        mutated = copy.deepcopy(function)
        node = list(ast.walk(mutated))[site.position]
        parent, name, index = _parents(mutated)[id(node)]
        _, change = _variants(list(ast.walk(function))[site.position], _parents(function))[
            site.variant
        ]
        replacement = change(node)
        if index is None:
            setattr(parent, name, replacement)
        else:
            getattr(parent, name)[index] = replacement
        self.value = _compile(self.module, site.function, mutated)

    def __enter__(self) -> "Mutant":
        owner_name, _, name = self.site.function.rpartition(".")
        self.owner = getattr(self.module, owner_name) if owner_name else self.module
        self.original = vars(self.owner)[name]
        setattr(self.owner, name, self.value)
        return self

    def __exit__(self, *exc: Any) -> None:
        setattr(self.owner, self.site.function.rpartition(".")[2], self.original)


# == running the original and the mutants ========================================================
def _seeded_model(target: Target) -> nn.Module:
    torch.manual_seed(0)
    return target.build()


def _passes(model: nn.Module, inputs: Any) -> List[torch.Tensor]:
    """Eval outputs (with and without autograd), training outputs and gradients, seeded."""
    from dltestkit.core.paths import named_tensors
    from dltestkit.models.tensors import call_model

    results: List[torch.Tensor] = []
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        results += [t for _, t in named_tensors(call_model(model, inputs))]
    torch.manual_seed(0)
    results += [t.detach() for _, t in named_tensors(call_model(model, inputs))]
    model.train()
    torch.manual_seed(0)
    output = call_model(model, inputs)
    floats = [t for _, t in named_tensors(output) if t.is_floating_point() and t.requires_grad]
    generator = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=generator)).sum() for t in floats)
    results += [t.detach() for _, t in named_tensors(output)]
    if isinstance(loss, torch.Tensor):
        loss.backward()
    results += [p.grad for p in model.parameters() if p.grad is not None]
    model.eval()
    return results


def covered_lines(target: Target) -> Set[Tuple[str, int]]:
    """(file, line) of every line the target's modules run in the passes on its inputs."""
    files = {
        str(Path(inspect.getsourcefile(importlib.import_module(name)) or "").resolve())
        for name in target.sources
    }
    seen: Set[Tuple[str, int]] = set()
    model = _seeded_model(target)

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            seen.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename in files else None

    sys.settrace(tracer)
    try:
        _passes(model, target.inputs())
    finally:
        sys.settrace(None)
    return seen


def _same(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    from dltestkit.core.compare import same

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def _change(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    """The largest difference of two passes' tensors relative to each tensor's largest
    magnitude (inf when their shapes or number differ)."""
    if len(a) != len(b):
        return float("inf")
    largest = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf")
        if not x.is_floating_point() or not x.numel():
            largest = max(largest, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        scale = float(y.double().abs().nan_to_num(0, 0, 0).max()) or 1.0
        gap = float((x.double() - y.double()).abs().nan_to_num(float("inf")).max())
        largest = max(largest, gap / scale)
    return largest


class _Timeout(Exception):
    pass


def _alarm(seconds: int) -> None:
    def raise_timeout(*_: Any) -> None:
        raise _Timeout()

    signal.signal(signal.SIGALRM, raise_timeout)
    signal.alarm(seconds)


@dataclass
class Outcome:
    site: Site
    status: str  # "killed" or "survived"; or why left out: build, crash, timeout, equivalent
    killed_by: str = ""
    reference: str = ""  # the reference checks' verdict: "killed" or "survived"
    #: pytest-torch's default checks' verdict ("killed" or "survived"; "" when not run), and
    #: the first of them that failed
    pytest_torch: str = ""
    pytest_torch_by: str = ""
    seconds: float = 0.0
    detail: str = ""
    #: the largest change of an output or gradient, relative to its largest magnitude
    change: float = float("inf")


def test_class(target_key: str, reference_file: Optional[str] = None) -> type:
    from dltestkit import ModelTests, SequenceModelTests

    target = TARGETS[target_key]

    def set_up(self: Any) -> None:
        self.model = target.build()
        self.inputs = target.inputs()
        self.make_model = target.build
        for name, value in target.options.items():
            setattr(self, name, value)
        if reference_file is not None:
            self.reference_file = reference_file
            self.reference_gradients = True

    mixin = SequenceModelTests if target.sequence else ModelTests
    return type(f"Test{target_key.title()}", (mixin, unittest.TestCase), {"setUp": set_up})


def default_checks(case: type) -> List[str]:
    from dltestkit.core.contract import checks_of

    return [name for name in checks_of(case) if not name.startswith("test_reference_")]


def _verdict(case: type, check: str) -> Optional[str]:
    """None when the check passes or skips, else the first line of what it reported."""
    result = unittest.TestResult()
    case(check).run(result)
    problems = result.failures + result.errors
    if not problems:
        return None
    lines = problems[0][1].strip().splitlines()
    raised = [line for line in lines if not line.startswith((" ", "Traceback", "[dltestkit]"))]
    return (raised[0] if raised else lines[-1])[:300]


_CACHE: Dict[str, Dict[str, Any]] = {}


def _pytest_torch_verdicts(target: Target) -> Dict[str, Tuple[str, str]]:
    from compare_pytest_torch import pytest_torch_verdicts

    return pytest_torch_verdicts(lambda: _seeded_model(target), target.inputs, seed=0)


def _prepared(target_key: str, with_pytest_torch: bool = False) -> Dict[str, Any]:
    """The original's passes and reference file, made once per process (and the pytest-torch
    checks that pass on it)."""
    if target_key not in _CACHE:
        target = TARGETS[target_key]
        model = _seeded_model(target)
        folder = tempfile.mkdtemp(prefix="mutation-benchmark-")
        # removed when this process ends, a worker of the pool included (which ends with
        # os._exit, after multiprocessing's finalizers but without atexit's)
        multiprocessing.util.Finalize(
            None, shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True}, exitpriority=0
        )
        reference = os.path.join(folder, f"{target_key}.safetensors")
        # The benchmark's references are temporary files of its own, written also where a CI
        # variable is set (which stops the writing of the references users commit).
        variables = dict.fromkeys(CI_VARIABLES, "")
        variables[WRITE_VARIABLE] = "1"
        with unittest.mock.patch.dict(os.environ, variables):
            result = unittest.TestResult()
            test_class(target_key, reference)("test_reference_outputs").run(result)
        if result.failures or result.errors or not os.path.exists(reference):
            problems = result.failures + result.errors + result.skipped
            raise RuntimeError(f"the reference of {target_key} was not written: {problems}")
        state = {k: v.clone() for k, v in model.state_dict().items()}  # before BatchNorm updates
        _CACHE[target_key] = {
            "state": state,
            "passes": _passes(model, target.inputs()),
            "reference": reference,
            "reference_size": os.path.getsize(reference),
        }
    if with_pytest_torch and "pytest_torch" not in _CACHE[target_key]:
        verdicts = _pytest_torch_verdicts(TARGETS[target_key])
        _CACHE[target_key]["pytest_torch"] = [
            name for name, (status, _) in verdicts.items() if status == "pass"
        ]
    return _CACHE[target_key]


def run_mutant(site: Site, check_timeout: int = 240, with_pytest_torch: bool = False) -> Outcome:
    """Build, compare and check one mutant."""
    started = time.perf_counter()
    target = TARGETS[site.target]
    prepared = _prepared(site.target, with_pytest_torch)
    outcome = Outcome(site, "")
    try:
        mutant = Mutant(site)
    except Exception as exc:
        outcome.status, outcome.detail = "build", f"{type(exc).__name__}: {exc}"[:200]
        return outcome
    with mutant, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _alarm(30)
            try:
                model = _seeded_model(target)
            except Exception as exc:
                outcome.status, outcome.detail = "build", f"{type(exc).__name__}: {exc}"[:200]
                return outcome
            with contextlib.suppress(Exception):  # a changed dimension: its own seeded weights
                model.load_state_dict(prepared["state"])
            try:
                passes = _passes(model, target.inputs())
            except _Timeout:
                outcome.status = "timeout"
                return outcome
            except Exception as exc:
                outcome.status, outcome.detail = "crash", f"{type(exc).__name__}: {exc}"[:200]
                return outcome
            if _same(passes, prepared["passes"]):
                outcome.status = "equivalent"
                return outcome
            outcome.change = _change(passes, prepared["passes"])
            signal.alarm(check_timeout)
            case = test_class(site.target)
            for check in default_checks(case):
                problem = _verdict(case, check)
                if problem is not None:
                    outcome.status, outcome.killed_by, outcome.detail = "killed", check, problem
                    break
            else:
                outcome.status = "survived"
            problem = _verdict(
                test_class(site.target, prepared["reference"]), "test_reference_outputs"
            )
            outcome.reference = "killed" if problem is not None else "survived"
            if with_pytest_torch:
                verdicts = _pytest_torch_verdicts(target)
                failed = [
                    name
                    for name in prepared["pytest_torch"]  # those that pass on the original
                    if verdicts[name][0] != "pass"
                ]
                outcome.pytest_torch = "killed" if failed else "survived"
                outcome.pytest_torch_by = failed[0] if failed else ""
        except _Timeout:
            outcome.status = "timeout"
        finally:
            signal.alarm(0)
            outcome.seconds = time.perf_counter() - started
    return outcome


def _worker_init() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


# == the run and the report ======================================================================
def sample(keys: Sequence[str], per_model: int, seed: int) -> Tuple[List[Site], Dict[str, int]]:
    chosen: List[Site] = []
    available = {}
    for key in keys:
        sites = sites_of(key, covered_lines(TARGETS[key]))
        available[key] = len(sites)
        rng = random.Random(f"{seed}-{key}")
        chosen += rng.sample(sites, min(per_model, len(sites)))
    return chosen, available


def _rate(killed: int, total: int) -> str:
    return f"{killed:3d}/{total:<3d} {100 * killed / total:5.1f}%" if total else "  -/0        "


def report(outcomes: List[Outcome], available: Dict[str, int], seconds: float) -> Dict[str, Any]:
    counted = [o for o in outcomes if o.status in ("killed", "survived")]
    left_out = Counter(o.status for o in outcomes if o.status not in ("killed", "survived"))
    print(f"\n{len(outcomes)} mutants in {seconds / 60:.1f} min; left out: "
          + ", ".join(f"{n} {k}" for k, n in sorted(left_out.items()))
          + f"; {len(counted)} non-equivalent mutants that run")  # fmt: skip

    compared = any(o.pytest_torch for o in counted)

    def rates(group: List[Outcome]) -> str:
        default = sum(o.status == "killed" for o in group)
        both = sum(o.status == "killed" or o.reference == "killed" for o in group)
        text = f"{_rate(default, len(group))}   {_rate(both, len(group))}"
        if compared:
            text += f"   {_rate(sum(o.pytest_torch == 'killed' for o in group), len(group))}"
        return text

    def table(title: str, key: Callable[[Outcome], str], order: Sequence[str]) -> None:
        extra = f"   {'pytest-torch':>15}" if compared else ""
        print(f"\n{title:<52} {'default checks':>15}   {'+ reference':>15}{extra}")
        for name in order:
            group = [o for o in counted if key(o) == name]
            if group:
                print(f"  {name:<50} {rates(group)}")
        print(f"  {'all':<50} {rates(counted)}")

    table("per model", lambda o: TARGETS[o.site.target].label,
          [t.label for t in TARGETS.values()])  # fmt: skip
    table("per operator", lambda o: o.site.operator, OPERATORS)
    print("\nkilled first by")
    for check, count in Counter(o.killed_by for o in counted if o.killed_by).most_common():
        print(f"  {check:<40} {count}")
    if compared:
        print("\npytest-torch: killed first by")
        for check, count in Counter(
            o.pytest_torch_by for o in counted if o.pytest_torch_by
        ).most_common():
            print(f"  {check:<40} {count}")
        print(
            "  killed by pytest-torch and not by the default checks:",
            sum(o.pytest_torch == "killed" and o.status == "survived" for o in counted),
        )
    print("\nkilled by the reference checks only:",
          sum(o.status == "survived" and o.reference == "killed" for o in counted))  # fmt: skip
    survivors = [o for o in counted if o.status == "survived"]
    print(
        f"\nsurviving the default checks ({len(survivors)}; R: killed by the references; the "
        "largest relative change of an output or gradient):"
    )
    for o in sorted(survivors, key=lambda o: (o.site.target, o.site.operator)):
        mark = "R" if o.reference == "killed" else " "
        print(f"  {mark} {o.site.target:<12} {o.site.operator:<10} {o.change:8.1e}  "
              f"{o.site.function}:{o.site.line}  {o.site.description}")  # fmt: skip
    rounding = [o for o in survivors if o.reference != "killed" and o.change < 1e-5]
    print(
        f"\n{len(rounding)} of the mutants that survive both change no output or gradient by "
        "more than 1e-5 of its largest magnitude (rounding: another path to the same values)"
    )
    return {
        "seconds": seconds,
        "available_sites": available,
        "outcomes": [dict(asdict(o), site=asdict(o.site)) for o in outcomes],
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(TARGETS), help="comma-separated keys")
    parser.add_argument("--per-model", type=int, default=150, help="mutants sampled per model")
    parser.add_argument("--quick", action="store_true", help="4 mutants per model")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="write every outcome to this file")
    parser.add_argument(
        "--pytest-torch",
        action="store_true",
        help="also run pytest-torch's default checks on each mutant (pip install pytest-torch)",
    )
    arguments = parser.parse_args(argv)
    keys = [key.strip() for key in arguments.models.split(",") if key.strip()]
    unknown = [key for key in keys if key not in TARGETS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(TARGETS)}")
    if arguments.pytest_torch:
        try:
            import pytest_torch  # noqa: F401
        except ImportError:
            parser.error("--pytest-torch: pytest-torch is not installed (pip install pytest-torch)")
    check = functools.partial(run_mutant, with_pytest_torch=arguments.pytest_torch)
    _worker_init()
    started = time.perf_counter()
    sites, available = sample(keys, 4 if arguments.quick else arguments.per_model, arguments.seed)
    print(f"{len(sites)} mutants sampled from "
          + ", ".join(f"{key} {available[key]}" for key in keys) + " mutation sites")  # fmt: skip
    outcomes: List[Outcome] = []
    if arguments.workers > 1:
        context = __import__("multiprocessing").get_context("spawn")
        with ProcessPoolExecutor(arguments.workers, context, initializer=_worker_init) as pool:
            for outcome in pool.map(check, sites, chunksize=1):
                outcomes.append(outcome)
                _progress(outcome, len(outcomes), len(sites))
    else:
        for site in sites:
            outcomes.append(check(site))
            _progress(outcomes[-1], len(outcomes), len(sites))
    results = report(outcomes, available, time.perf_counter() - started)
    sizes = {key: _prepared(key)["reference_size"] for key in keys}
    print(
        "\nreference file sizes: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in sizes.items())
    )
    results["reference_sizes"] = sizes
    if arguments.pytest_torch:
        from compare_pytest_torch import PYTEST_TORCH_CHECKS

        left_out = {
            key: [c for c in PYTEST_TORCH_CHECKS if c not in _prepared(key, True)["pytest_torch"]]
            for key in keys
        }
        print(
            "pytest-torch checks left out (they fail on the original model): "
            + (", ".join(f"{k} {' '.join(v)}" for k, v in left_out.items() if v) or "none")
        )
        results["pytest_torch_left_out"] = left_out
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def _progress(outcome: Outcome, done: int, total: int) -> None:
    verdict = outcome.status + (f" by {outcome.killed_by}" if outcome.killed_by else "")
    if outcome.reference:
        verdict += f"; reference: {outcome.reference}"
    if outcome.pytest_torch:
        verdict += f"; pytest-torch: {outcome.pytest_torch} {outcome.pytest_torch_by}".rstrip()
    print(f"[{done}/{total}] {outcome.site.target} {outcome.site.operator} "
          f"{outcome.site.function}:{outcome.site.line}: {verdict} ({outcome.seconds:.1f} s)",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
