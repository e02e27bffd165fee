"""ModelTests: checks for torch nn.Modules."""
from __future__ import annotations

import contextlib
import copy
import fnmatch
from typing import Any, Callable, ClassVar, Collection, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ._base import Attribute, CheckMixin, check, is_instance, is_optional_number, is_shape
from ._random import _mps_available
from ._tensors import as_args, batch_tensors, map_tensors, named_tensors, select_tensor

__all__ = ["ModelTests"]

_DEVICE_MIXING = ("is not on the expected device", "to be on the same device",
                  "Expected all tensors to be on the same device")


def _is_inputs(value: Any) -> Optional[str]:
    tensors = batch_tensors(value)
    if not tensors:
        return "holds no tensor with a batch dimension"
    if len({t.shape[0] for t in tensors}) > 1:
        return f"holds tensors with different batch sizes {[t.shape[0] for t in tensors]}"
    return None


def accelerators() -> List[str]:
    """The GPU devices present (CUDA, MPS)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if _mps_available():
        found.append("mps")
    return found


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put every submodule in train or eval mode; restore each one's own mode after."""
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in modes.items():
            module.training = was_training


class ModelTests(CheckMixin):
    """Checks for a model.

    Required in setUp:
        ``self.model`` (an ``nn.Module``) and ``self.inputs`` (a batch: a tensor, or a
        tuple of tensors passed as ``model(*inputs)``; batch dimension first).
    Optional:
        ``self.expected_output_shape`` (the output shape for ``self.inputs``; default:
        the shape of ``self.inputs``), ``self.output_key`` (which element of a tuple or
        dict output is checked; default: a tensor output itself, element 0 of a tuple),
        ``self.loss_fn`` (``output -> scalar`` used by the gradient checks; default: a
        fixed random weighting of the checked output, summed),
        ``self.allowed_unchanged_parameters`` (names or glob patterns of parameters that
        may legitimately get no gradient), ``self.device_rtol``/``self.device_atol``
        (tolerances comparing GPU with CPU outputs; default: those of
        ``torch.testing.assert_close``).
    """

    _mixin_name: ClassVar[str] = "ModelTests"
    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute("model", "the model under test", "MyModel()", required=True,
                  validate=is_instance(nn.Module, description="a torch.nn.Module")),
        Attribute("inputs", "a batch of inputs, batch dimension first",
                  "torch.randn(4, 1, 32, 32)", required=True, validate=_is_inputs),
        Attribute("expected_output_shape", "the output shape for self.inputs",
                  "(4, 10)", validate=is_shape),
        Attribute("output_key", "the index or key of the output tensor to check", "0",
                  validate=is_instance(int, str, type(None), description="an int or str")),
        Attribute("loss_fn", "a function of the model output giving a scalar loss",
                  "lambda out: out[0].square().mean()",
                  validate=lambda v: None if v is None or callable(v) else "is not callable"),
        Attribute("allowed_unchanged_parameters",
                  "names or glob patterns of parameters that may stay unchanged",
                  '["decoder.unused.*"]',
                  validate=is_instance(list, tuple, set, frozenset,
                                       description="a collection of names")),
        Attribute("device_rtol", "the relative tolerance comparing GPU and CPU outputs", "1e-4",
                  validate=is_optional_number),
        Attribute("device_atol", "the absolute tolerance comparing GPU and CPU outputs", "1e-5",
                  validate=is_optional_number),
    )

    output_key: Optional[Any] = None
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = None
    allowed_unchanged_parameters: Collection[str] = ()
    device_rtol: Optional[float] = None
    device_atol: Optional[float] = None

    # -- helpers -----------------------------------------------------------------
    def _batch_size(self) -> int:
        return batch_tensors(self.inputs)[0].shape[0]

    def _output(self, output: Any) -> torch.Tensor:
        return select_tensor(output, self.output_key, "the model output", "output_key")

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        """Fixed random weights, so that no summed output can cancel (e.g. softmax rows)."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like)

    def _loss(self, output: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output)
        checked = self._output(output)
        return (checked * self._weights(checked)).sum()

    def _expected_shape(self) -> Tuple[int, ...]:
        if hasattr(self, "expected_output_shape"):
            return tuple(self.expected_output_shape)
        if not isinstance(self.inputs, torch.Tensor):
            self.skipTest("self.inputs is a tuple; set self.expected_output_shape to enable "
                          "this check")
        return tuple(self.inputs.shape)

    def _resized_inputs(self, size: int) -> Any:
        """self.inputs with ``size`` samples (repeating samples if needed)."""
        index = torch.arange(size) % self._batch_size()
        return map_tensors(lambda t: t[index] if t.dim() > 0 else t, self.inputs)

    # -- the checks --------------------------------------------------------------
    @check
    def test_output_shape(self) -> None:
        """Check that the output shape is ``expected_output_shape`` at this and other batch sizes."""
        expected = self._expected_shape()
        batch = self._batch_size()
        if expected and expected[0] != batch:
            self.fail(f"self.expected_output_shape {expected} must start with the batch size "
                      f"of self.inputs ({batch})")
        with _mode(self.model, training=False), torch.no_grad():
            for size in dict.fromkeys((batch, 1, batch + 1)):
                with self.subTest(batch_size=size):
                    hint = ("The model only works at the batch size of self.inputs: look for "
                            "a hard-coded batch size or a squeeze() in forward (use x.shape[0], "
                            "nn.Flatten/nn.Unflatten, squeeze(dim)).")
                    try:
                        output = self._output(self.model(*as_args(self._resized_inputs(size))))
                    except Exception as exc:
                        if size == batch:
                            raise
                        self.fail(f"at batch size {size} the model raises "
                                  f"{type(exc).__name__}: {exc}. {hint}")
                    wanted = (size, *expected[1:])
                    if tuple(output.shape) != wanted:
                        self.fail(
                            f"at batch size {size} the output has shape {tuple(output.shape)}, "
                            f"expected {wanted}. " + (hint if size != batch else
                                                      "Fix the model or "
                                                      "self.expected_output_shape.")
                        )

    def _run(self, model: nn.Module, device: str, seed: int, training: bool = False) -> Any:
        inputs = map_tensors(lambda t: t.to(device), self.inputs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with _mode(model, training=training), torch.no_grad():
                return model(*as_args(inputs))

    def _check_meta(self) -> None:
        moved = copy.deepcopy(self.model).to("meta")
        # Both modes: stochastic layers (a VAE's sampling, dropout) often run in training only.
        for training in (False, True):
            self._check_meta_forward(moved, training)

    def _check_meta_forward(self, moved: nn.Module, training: bool) -> None:
        mode = "training" if training else "eval"
        try:
            output = self._run(moved, "meta", self.seed, training)
        except Exception as exc:
            text = str(exc)
            if isinstance(exc, RuntimeError) and any(s in text for s in _DEVICE_MIXING):
                self.fail(
                    "the model does not move to another device as a whole: after .to('meta') "
                    f"its forward in {mode} mode combines a tensor left on the CPU "
                    f"({text.strip()}). Usual "
                    "causes: a tensor created without device= in forward (torch.randn(shape) "
                    "-> torch.randn_like(x) or device=x.device), a tensor attribute that is not "
                    "registered (self.register_buffer), layers kept in a plain Python list "
                    "(nn.ModuleList). The same code fails on a GPU."
                )
            if isinstance(exc, NotImplementedError) or "meta" in text.lower():
                self.skipTest(
                    "the model uses an operation the meta device cannot run "
                    f"({type(exc).__name__}: {text.strip().splitlines()[0]}), so device bugs "
                    "cannot be checked without a GPU"
                )
            raise
        self._assert_outputs_on(output, "meta", mode)

    def _assert_outputs_on(self, output: Any, device: str, mode: str) -> None:
        """Every output tensor of the model's copy on ``device`` is on ``device``."""
        stray = [f"{path} (on {tensor.device})" for path, tensor in named_tensors(output)
                 if tensor.device.type != device]
        if stray:
            self.fail(f"after .to({device!r}) the model returns {', '.join(stray)} in {mode} "
                      "mode; create outputs on the inputs' device (no fixed device, no tensor "
                      "made without device= in forward)")

    def _check_accelerator(self, device: str) -> None:
        reference = self._run(self.model, "cpu", self.seed)
        deterministic = all(
            torch.equal(a, b) for (_, a), (_, b) in
            zip(named_tensors(reference), named_tensors(self._run(self.model, "cpu", self.seed + 1)))
        )
        moved = copy.deepcopy(self.model).to(device)
        on_device = self._run(moved, device, self.seed)
        self._assert_outputs_on(on_device, device, "eval")
        on_device = map_tensors(lambda t: t.cpu(), on_device)
        if deterministic:
            torch.testing.assert_close(
                on_device, reference, rtol=self.device_rtol, atol=self.device_atol,
                msg=lambda m: f"the model on {device} gives other outputs than on the CPU:\n{m}")
        else:  # stochastic even in eval mode: GPU noise differs from CPU noise
            for (path, a), (_, b) in zip(named_tensors(on_device), named_tensors(reference)):
                self.assertEqual(a.shape, b.shape, f"{path} has another shape on {device}")
                self.assertTrue(torch.isfinite(a).all(), f"{path} is not finite on {device}")
        self._assert_outputs_on(self._run(moved, device, self.seed, training=True), device,
                                "training")
        back = self._run(moved.to("cpu"), "cpu", self.seed)
        torch.testing.assert_close(
            back, reference, rtol=0, atol=0,
            msg=lambda m: f"the model moved to {device} and back gives other outputs:\n{m}")

    @check
    def test_device_moving(self) -> None:
        """Check that the model moves to another device as a whole (on ``meta``, no GPU needed)."""
        self._check_meta()

    @check
    def test_device_moving_on_gpu(self) -> None:
        """Check that a copy moved to each GPU (CUDA, MPS) and back gives the CPU's outputs."""
        found = accelerators()
        if not found:
            self.skipTest("no CUDA or MPS device: outputs on a GPU were not compared; "
                          "test_device_moving checked device bugs on the meta device")
        for device in found:
            with self.subTest(device=device):
                self._check_accelerator(device)

    @check
    def test_batch_independence(self) -> None:
        """Check that each sample's output depends on its own input only (eval mode)."""
        inputs = map_tensors(lambda t: t.detach().clone().requires_grad_(t.is_floating_point()),
                             self.inputs)
        leaves = [t for t in batch_tensors(inputs) if t.requires_grad]
        if not leaves:
            self.skipTest("self.inputs has no floating-point tensor to take gradients of")
        batch = self._batch_size()
        if batch < 2:
            self.fail("self.inputs must hold at least 2 samples to check batch independence")
        with _mode(self.model, training=False):
            for index in range(batch):
                output = self._output(self.model(*as_args(inputs)))
                if output.shape[0] != batch:
                    self.fail(f"the output's first dimension is {output.shape[0]}, not the "
                              f"batch size {batch}")
                keep = torch.ones(batch, dtype=output.dtype, device=output.device)
                keep[index] = 0
                weights = self._weights(output) * keep.view(-1, *[1] * (output.dim() - 1))
                grads = torch.autograd.grad((output * weights).sum(), leaves, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
                if any(g[index].ne(0).any() for g in grads):
                    self.fail(
                        f"sample {index}'s input gets a gradient from the outputs of the other "
                        f"samples of the batch (its own output masked out): the model mixes "
                        "samples. Look for a reshape/view used instead of a transpose/permute, "
                        "softmax/normalisation over dim 0, statistics over the batch, or "
                        "BatchNorm with track_running_stats=False."
                    )
                dead = [other for other in range(batch) if other != index
                        and all(g[other].eq(0).all() for g in grads)]
                if dead:
                    self.fail(f"samples {dead} get no gradient from their own outputs: the "
                              "output does not depend on the input (with sample "
                              f"{index} masked out)")

    def _gradients(self, model: nn.Module) -> Tuple[Any, Dict[str, Optional[torch.Tensor]]]:
        """Output and parameter gradients of one training-mode step on ``model``."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with _mode(model, training=True):
            output = model(*as_args(self.inputs))
            loss = self._loss(output)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return output, {name: grad for (name, _), grad in zip(named, grads)}

    def _allowed(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern)
                   for pattern in self.allowed_unchanged_parameters)

    @check
    def test_all_parameters_updated(self) -> None:
        """Check that one optimisation step gives every trainable parameter a gradient and changes it."""
        model = copy.deepcopy(self.model)
        _, grads = self._gradients(model)
        if not grads:
            self.fail("the model has no trainable parameter")
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        params = dict(model.named_parameters())
        for name, grad in grads.items():
            params[name].grad = grad
        torch.optim.Adam([params[name] for name in grads], lr=1e-3).step()
        problems = []
        for name, grad in grads.items():
            if self._allowed(name):
                continue
            if grad is None:
                problems.append(f"{name}: no gradient (not used in forward, or cut off by "
                                ".detach()/.data/torch.no_grad())")
            elif not torch.isfinite(grad).all():
                problems.append(f"{name}: gradient contains NaN or Inf")
            elif not grad.ne(0).any():
                problems.append(f"{name}: gradient is exactly zero")
            elif torch.equal(params[name].detach(), before[name]):
                problems.append(f"{name}: value unchanged by the optimisation step")
        if problems:
            self.fail(
                f"{len(problems)} of {len(grads)} trainable parameters would not be trained:\n  "
                + "\n  ".join(problems)
                + "\nUse every layer in forward and do not detach on the way to the output; if "
                "a parameter may stay untouched, list it in self.allowed_unchanged_parameters."
            )

    @check
    def test_finite_outputs_and_gradients(self) -> None:
        """Check that the outputs and every parameter's gradient contain no NaN or Inf."""
        output, grads = self._gradients(copy.deepcopy(self.model))
        bad_outputs = [f"{path} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
                       for path, t in named_tensors(output)
                       if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad_outputs:
            self.fail(f"the model's outputs contain NaN or Inf: {', '.join(bad_outputs)}. Look "
                      "for log/sqrt/division of values that can be zero or negative, or exp "
                      "overflow.")
        bad_grads = [name for name, grad in grads.items()
                     if grad is not None and not torch.isfinite(grad).all()]
        if bad_grads:
            self.fail(f"the gradients of {', '.join(bad_grads)} contain NaN or Inf although "
                      "the outputs are finite. Look for sqrt/log/pow at zero or division by "
                      "a small number in forward.")
