"""test_batch_independence: each sample's output depends on its own input only."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..core.compare import mismatch, same
from ..core.contract import check
from ..core.messages import sized
from ..core.options import option
from ..core.paths import map_tensors, named_tensors
from ..core.validators import is_bool
from .dependence import Dependence, GradientsRefused
from .probes import Probe
from .tensors import Key, batch_entries, describe_input, replace_entries, sample_lists

__all__ = ["BatchIndependence"]

#: A checked output: a tensor, batch first, or the checked tensor of each sample's element.
_Checked = Union[torch.Tensor, List[torch.Tensor]]


#: An output compared for one sample: path, for self.inputs, for another batch, is checked.
_Pair = Tuple[str, torch.Tensor, torch.Tensor, bool]


#: A difference: path, (for the other batch, for self.inputs), report, is checked.
_Found = Tuple[str, Tuple[torch.Tensor, torch.Tensor], str, bool]


class BatchIndependence(Dependence):
    """Samples are not mixed across the batch."""

    independent_of_batch_shapes: bool = option(False, is_bool, example="True")
    """Whether each sample's outputs must not change with the shapes of the other samples either.

    For a list of samples of different shapes in `inputs` (images of several sizes). `False`: an
    output that changes with the shapes of the other samples but not with their values (every sample
    padded to the largest of the batch, as torchvision's detection models do) makes that sample's
    comparison a skipped part of the check, which names the output; `True`: a failure."""

    # -- dependence on the inputs -------------------------------------------------------------
    @check(
        reads=(
            "model",
            "inputs",
            "unbatched_inputs",
            "output_key",
            "cross_sample_outputs",
            "independent_of_batch_shapes",
        )
    )
    def test_batch_independence(self) -> None:
        """Check that each sample's output depends on its own input only (eval mode).

        Catches samples mixed across the batch: a reshape used as a transpose, softmax or
        normalisation over dim 0, batch statistics, also when computed without gradient
        (detach, no_grad, .data); for token inputs too, through their embeddings.

        Two comparisons: gradients (no other sample's output may depend on sample ``i``'s
        input, exactly), and values (sample ``i``'s outputs in a batch of copies of sample
        ``i`` must be those in ``inputs``). When no input can be differentiated (token ids
        transformed before their embedding) or the output is not computed from the inputs in
        the autograd graph (a frozen part under torch.no_grad()), only the values are
        compared, and the failure message says so.
        """
        batch = self._batch_size()
        if batch < 2:
            raise self._contract_error(
                "inputs",
                f"holds {batch} sample; test_batch_independence needs at least 2 (4 is plenty)",
            )
        # Where the other samples' outputs depend on each sample's probes, by gradients: the
        # screen of the probed pass the checks share shows most models independent exactly;
        # where it cannot, this check's own pass compares them exactly; where no gradient can
        # be taken through the eval-mode pass, the values decide, on every sample.
        shared = self._probed_pass()
        self._checked_output(shared.output)  # (its shape, reported as the check's own pass would)
        probes: List[Probe]
        if shared.refused is not None:
            refused = GradientsRefused(shared.refused)
            self._judged_by_values(refused, "the samples were compared by values only")
            probes, traced = [], False
        elif shared.screen is not None and shared.screen[1]:
            probes, traced = list(shared.probes), shared.screen[0]
        else:
            output, probes = self._probe(self.model, required=False)
            per_sample, checked, weights, others_output = self._checked_output(output)
            try:
                traced = self._independent_by_gradient(
                    output, checked, weights, per_sample, probes, others_output
                )
            except GradientsRefused as exc:
                self._judged_by_values(exc, "the samples were compared by values only")
                probes, traced = [], False
        self._compare_with_copies(probes, traced)

    def _independent_by_gradient(
        self,
        output: Any,
        checked: torch.Tensor,
        weights: List[torch.Tensor],
        per_sample: bool,
        probes: List[Probe],
        others_output: Callable[[int], torch.Tensor],
    ) -> bool:
        """Fail where the other samples' outputs depend on a sample's probes, by gradients:
        first a screen of two backward passes, which shows most models independent exactly;
        where it cannot, for every sample at once, in one batched backward pass when it can
        run. Return whether the checked output is computed from the probes at all (traced),
        which the same gradients tell."""
        batch = self._batch_size()
        if not probes or not checked.requires_grad:
            return False
        every: Optional[List[List[torch.Tensor]]] = None
        screened = self._screened_independence(
            checked, torch.ones_like(checked) if per_sample else weights[0], probes
        )
        if screened is not None and screened[1]:
            return screened[0]  # independent
        masks = 1 - torch.eye(batch, dtype=checked.dtype)
        if per_sample:
            masked = masks
        else:
            shape = (batch, batch) + (1,) * (checked.dim() - 1)
            masked = masks.view(shape) * weights[0].unsqueeze(0)
        batched = self._batched_dependence(checked, masked, probes)
        if batched is None:
            traced = self._connected(checked, probes)
        else:
            traced, every = batched
        if not traced:
            return False
        for index in range(batch):
            depends = (
                every[index]
                if every is not None
                else self._dependence(others_output(index), probes)
            )
            for probe, where in zip(probes, depends):
                if probe.depends(where, index):
                    if not per_sample:
                        self._skip_if_pairwise(output, checked, weights[0], probes, index)
                    self.fail(
                        f"sample {index}'s {probe.describe()} gets a gradient from the outputs "
                        "of the other samples of the batch (its own output masked out): the "
                        "model mixes samples. Look for a reshape/view used instead of a "
                        "transpose/permute, softmax/normalisation over dim 0, statistics over "
                        "the batch, or BatchNorm with track_running_stats=False."
                    )
        return True

    def _skip_if_pairwise(
        self,
        output: Any,
        checked: torch.Tensor,
        weights: torch.Tensor,
        probes: List[Probe],
        sample: int,
    ) -> None:
        """Skip when the checked output compares pairs of samples by design: its second
        dimension is the batch too, and element (r, c) depends on samples r and c only (a
        similarity matrix: CLIP's logits_per_image, scores against in-batch negatives)."""
        batch = self._batch_size()
        if checked.dim() < 2 or checked.shape[1] != batch:
            return
        others = [other for other in range(batch) if other != sample]
        pairs = (checked[others][:, others] * weights[others][:, others]).sum()
        if any(where[sample].any() for where in self._dependence(pairs, probes)):
            return
        key = "" if self.output_key is None else f" (output_key={self.output_key!r})"
        self.skipTest(
            f"the checked output{key}, of shape {tuple(checked.shape)}, compares pairs of "
            f"samples: its element (i, j) depends on samples i and j only, as a similarity "
            "matrix does (CLIP's logits_per_image, scores against in-batch negatives), which "
            "is a design, not a mix-up. List it in self.cross_sample_outputs, or set "
            "self.output_key to a per-sample output (an embedding), so that the samples' "
            f"independence is checked.{self._output_hint(output)}"
        )

    def _compare_with_copies(self, probes: List[Probe], traced: bool) -> None:
        """The value part of test_batch_independence: for a sample ``i``, every output of a
        batch of ``batch`` copies of sample ``i`` (same batch size, so the same kernels) must
        be sample ``i``'s output for self.inputs (within the dtype's default tolerance).
        Compared: the checked output and every other floating-point output whose first
        dimension behaves as the batch (equal rows for a batch of copies); for an output that
        is one element per sample, every tensor of sample ``i``'s element, with its shape.

        ``traced`` (the gradient comparison ran and passed, so only mixing through values
        without gradient is left to find): the copies of samples 0 and 1 are compared, and
        their other positions screen the other samples: a sample whose output they do not
        repeat at its position (a leak into that sample, or random numbers drawn per
        position, which differ there by design) gets its own copies compared. A statistic
        over the batch that copies of one sample leave unchanged (a global maximum that sample
        holds) cannot be so for two. Not ``traced``: every sample's copies (the outputs of all
        are needed to tell an output that ignores the inputs).

        Copies of sample ``i`` also change the shapes of the other samples of a list of
        samples of different shapes: when only that explains a difference (the same batch
        with the other samples' values changed and their shapes kept gives sample ``i`` the
        outputs it has for self.inputs), the part for sample ``i`` is skipped, saying so,
        unless independent_of_batch_shapes is set."""
        batch = self._batch_size()
        together = self._eval_pass()
        per_sample = self._per_sample(together, batch)

        def copies_of(sample: int) -> Any:
            with torch.no_grad():
                return self._forward(self.model, self._inputs_of([sample] * batch))

        def compare(sample: int, copies: Any) -> None:
            what = f"a batch of {batch} copies of sample {sample}"
            pairs = self._pairs(together, copies, sample, per_sample, what)
            found = _first_mismatch(pairs, cut=not per_sample)
            if found is None or self._shapes_explain(together, sample, per_sample, pairs, found):
                return
            path, values, report, checked = found
            self._fail_batch_dependent(
                together, sample, path, values, report, probes, traced, checked
            )

        samples = list(range(min(2, batch) if traced else batch))
        alone = [copies_of(sample) for sample in samples]
        suspects: List[int] = []  # other samples whose outputs the copies do not repeat
        for sample, copies in zip(samples, alone):
            compare(sample, copies)
            for position in range(batch) if traced else ():
                if position in samples or position in suspects:
                    continue
                what = f"position {position} of a batch of {batch} copies of sample {sample}"
                try:
                    pairs = self._pairs(together, copies, sample, per_sample, what, position)
                except self.failureException:  # other outputs there: judged on its own copies
                    suspects.append(position)
                    continue
                if _first_mismatch(pairs, cut=not per_sample) is not None:
                    suspects.append(position)
        for sample in suspects:  # (random numbers drawn per position also differ there)
            compare(sample, copies_of(sample))
        if not traced:  # (batch statistics make copies give the same output: checked first)
            outputs: List[_Checked] = [
                self._sample_outputs(copies) if per_sample else self._output(copies)
                for copies in alone
            ]
            self._fail_if_ignored(together, probes, outputs)

    def _pairs(
        self,
        together: Any,
        other: Any,
        sample: int,
        per_sample: bool,
        what: str,
        position: Optional[int] = None,
    ) -> List[_Pair]:
        """The outputs of sample ``sample`` to compare, for self.inputs (``together``) and for
        another batch (``other``, described by ``what``, at ``position``, by default the
        sample's own): (path, for self.inputs, for the other batch, whether it is the checked
        output), the checked output first."""
        at = sample if position is None else position
        batch = self._batch_size()
        if per_sample:
            if not isinstance(other, list) or len(other) != batch:
                self.fail(
                    f"for {what} the model returns {sized(other)}, for self.inputs a list of "
                    f"{batch}: one element per sample expected (see test_output_shape)"
                )
            prefix = f"output[{sample}]"
            checked = self._sample_outputs([together[sample]])[0]
            passed_over = self.cross_sample_outputs
            named = (
                [(f"{prefix}[{self.output_key!r}]", checked)]
                if self.output_key is not None
                else list(named_tensors(together[sample], prefix, passed_over))
            )
            theirs = (
                {named[0][0]: self._sample_outputs([other[at]])[0]}
                if self.output_key is not None
                else dict(named_tensors(other[at], prefix, passed_over))
            )
            if sorted(theirs) != sorted(path for path, _ in named):
                self.fail(
                    f"sample {sample}'s output changes with the other samples of the batch: "
                    f"for {what} it holds {', '.join(theirs) or 'no tensor'}, for self.inputs "
                    f"{', '.join(path for path, _ in named) or 'no tensor'}"
                )
            pairs = [(path, mine, theirs[path], mine is checked) for path, mine in named]
        else:
            checked = self._output(together)
            named = (
                []
                if self.output_key is not None
                else list(named_tensors(together, passed_over=self.cross_sample_outputs))
            )
            if not any(t is checked for _, t in named):
                named.insert(0, ("checked output", checked))
            outputs = dict(named_tensors(other))
            outputs.setdefault("checked output", self._output(other))
            pairs = []
            for path, mine in named:
                found = outputs.get(path)
                if _comparable(mine, found, batch, at, mine is checked):
                    assert found is not None
                    pairs.append((path, mine[sample], found[at], mine is checked))
        return sorted(pairs, key=lambda pair: not pair[3])

    def _shapes_explain(
        self, together: Any, sample: int, per_sample: bool, pairs: List[_Pair], found: _Found
    ) -> bool:
        """Whether the difference ``found`` for copies of sample ``sample`` comes from the
        other samples' shapes only; if so, report it as a skipped part of the check."""
        varying = self._varying_shapes()
        if not varying or self.independent_of_batch_shapes:
            return False
        what = "the batch with the other samples' values changed"
        path = found[0]
        try:
            with torch.no_grad():
                changed = self._forward(self.model, self._other_values_changed(sample))
        except Exception as exc:
            self._skip_subtest(
                f"sample {sample}'s {path} changes for a batch of {self._batch_size()} copies "
                f"of sample {sample}, in which the other samples have other shapes than in "
                f"self.inputs ({'; '.join(varying)}). Whether it changes with their shapes (by "
                "design, for a model that pads every sample to the largest of its batch) or "
                "with their values could not be told: the model raises on the other samples' "
                f"values changed (x -> 2x + 1), {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Set "
                "self.independent_of_batch_shapes = True to fail on the difference",
                sample=sample,
            )
            return True
        kept = {path for path, *_ in pairs}
        again = [
            pair
            for pair in self._pairs(together, changed, sample, per_sample, what)
            if pair[0] in kept
        ]
        if _first_mismatch(again, cut=not per_sample) is not None:
            return False
        _, (alone, mine), _, _ = found
        how = (
            f"has shape {tuple(alone.shape)}, for self.inputs {tuple(mine.shape)}"
            if alone.shape != mine.shape
            else "differs from the output for self.inputs"
        )
        self._skip_subtest(
            f"sample {sample}'s {path} changes with the shapes of the other samples of "
            f"the batch, not with their values ({'; '.join(varying)}): for a batch of "
            f"{self._batch_size()} copies of sample {sample} it {how}, but with the other "
            "samples' values changed (x -> 2x + 1) and their shapes kept it is the same. A "
            "model that pads every sample to the largest of its batch does this by design "
            "(torchvision's detection models); set self.independent_of_batch_shapes = "
            "True to fail on it",
            sample=sample,
        )
        return True

    def _skip_subtest(self, reason: str, **params: Any) -> None:
        """Report one part of a check as skipped (a skipped subtest) and go on with the rest."""
        with self.subTest(**params):
            self.skipTest(reason)

    def _fail_if_ignored(
        self,
        together: Any,
        probes: List[Probe],
        alone: Sequence[_Checked],
    ) -> None:
        """When no gradient could be traced: fail (skip without any probe) if every sample
        gets exactly the same checked output although the samples' inputs differ."""
        entries = batch_entries(self.inputs, self.unbatched_inputs)
        inputs_differ = any(
            not _same_sample(value, i, 0) for _, value in entries for i in range(len(value))
        )
        if not inputs_differ or not all(_same_checked(out, alone[0]) for out in alone):
            return
        if probes:
            self.fail(
                f"the checked output does not depend on "
                f"{' or '.join(p.describe() for p in probes)} at all: in eval mode it is not "
                "computed from them in the autograd graph, and every sample gets the same "
                "output although the samples differ (it is built from a constant or from "
                "torch.zeros_like(x), or the inputs are not used)."
                f"{self._output_hint(together)}"
            )
        self.skipTest(
            "every sample gets exactly the same checked output in eval mode although the "
            "samples differ (a zero-initialised output layer, or an output that ignores the "
            "inputs), so comparing outputs shows nothing, and no input can be differentiated: "
            f"{self._unprobed_reason()}"
        )

    def _fail_batch_dependent(
        self,
        together: Any,
        sample: int,
        path: str,
        values: Tuple[torch.Tensor, torch.Tensor],
        report: str,
        probes: List[Probe],
        traced: bool,
        checked: bool,
    ) -> None:
        """Fail: sample ``sample``'s output ``path`` differs (``values``: for copies of the
        sample, for self.inputs), unless the model's outputs change from call to call.
        ``traced``: the gradient comparison of the checked output ran (and passed)."""
        alone, mine = values
        with torch.no_grad():
            again = self._forward(self.model, self.inputs)
        if not all(
            same(a, b) for (_, a), (_, b) in zip(named_tensors(together), named_tensors(again))
        ):
            self.skipTest(
                "two eval-mode passes over self.inputs give different outputs (state that "
                "changes between calls; see test_eval_deterministic), so outputs for other "
                "batches could not be compared"
                + (" (the gradient comparison passed)" if traced else "")
            )
        batch = self._batch_size()
        if alone.shape == mine.shape:
            one_nan = alone.isnan() ^ mine.isnan()
            difference = (alone.double() - mine.double()).abs()[~(alone.isnan() | mine.isnan())]
            largest = float(difference.max()) if difference.numel() else 0.0
            how = f"it differs from the output for self.inputs by up to {largest:.3g}" + (
                " and is NaN where the other is not" if bool(one_nan.any()) else ""
            )
        else:
            how = f"it has shape {tuple(alone.shape)}, for self.inputs {tuple(mine.shape)}"
        lead = (
            f"sample {sample}'s {path} changes with the other samples of the batch: "
            f"for a batch of {batch} copies of sample {sample} {how}"
        )
        if traced and checked:
            cause = (
                ", although no gradient flows between the samples. The model mixes samples "
                "through values computed without gradient: statistics over the batch taken "
                "under torch.no_grad(), with .detach() or on .data (a hand-written "
                "normalisation), BatchNorm with track_running_stats=False run under "
                "torch.no_grad(), routing with a capacity per batch."
            )
        else:
            cause = (
                ". The model mixes samples: a reshape/view used instead of a "
                "transpose/permute, softmax/normalisation over dim 0, statistics over the "
                "batch (also when computed under torch.no_grad(), with .detach() or on .data), "
                "BatchNorm with track_running_stats=False, routing with a capacity per batch."
            )
            if not traced:
                cause += " (Only outputs were compared: " + (
                    "the checked output is not computed from the inputs in the autograd graph.)"
                    if probes
                    else f"no input can be differentiated: {self._unprobed_reason()}.)"
                )
        self.fail(
            f"{lead}{cause} A mixture of experts that drops tokens over its capacity, or "
            "dynamic quantisation (activation scales taken over the batch), is "
            "batch-dependent by design: skip this check for such a model.\n"
            f"{report}"
        )

    def _varying_shapes(self) -> List[str]:
        """The lists of samples in self.inputs whose samples differ in shape, described."""
        found = []
        for key, samples in sample_lists(self.inputs, self.unbatched_inputs):
            shapes = [
                tuple((path, tuple(t.shape)) for path, t in named_tensors(item, ""))
                for item in samples
            ]
            if len(set(shapes)) == 1:
                continue
            if all(isinstance(item, torch.Tensor) for item in samples):
                seen = ", ".join(dict.fromkeys(str(tuple(t.shape)) for t in samples))
                found.append(f"{describe_input(key)} holds samples of shapes {seen}")
            else:
                found.append(f"{describe_input(key)} holds samples of different shapes")
        return found

    def _other_values_changed(self, sample: int) -> Any:
        """self.inputs with the floating-point values of every sample but ``sample`` changed
        (x -> 2x + 1, which keeps the order of box coordinates), every shape kept."""

        def changed(tensor: torch.Tensor) -> torch.Tensor:
            return tensor * 2 + 1 if tensor.is_floating_point() else tensor.clone()

        new: Dict[Key, Any] = {}
        for key, value in batch_entries(self.inputs, self.unbatched_inputs):
            if isinstance(value, list):
                new[key] = [
                    map_tensors(changed if index != sample else torch.clone, item)
                    for index, item in enumerate(value)
                ]
            else:
                tensor = value.clone()
                if tensor.is_floating_point():
                    others = torch.tensor([i for i in range(len(tensor)) if i != sample])
                    tensor[others] = tensor[others] * 2 + 1
                new[key] = tensor
        return replace_entries(self.inputs, new)


def _first_mismatch(pairs: List[_Pair], cut: bool) -> Optional[_Found]:
    """The first pair whose outputs differ (beyond the dtype's default tolerance), if any.
    ``cut``: compare over the extent both have in every dimension (an output padded to the
    longest sample of its batch); else a different shape is a difference (another number
    of detections)."""
    for path, mine, theirs, checked in pairs:
        if cut:
            theirs, mine = _common(theirs, mine)
        if theirs.shape != mine.shape:
            report: Optional[str] = (
                f"{path} has shape {tuple(theirs.shape)} for that batch and {tuple(mine.shape)} "
                "for self.inputs (a different number of elements, e.g. of detections, is a "
                "difference)"
            )
        else:
            report = mismatch(theirs, mine)
        if report is not None:
            return path, (theirs, mine), report, checked
    return None


def _same_sample(value: Any, index: int, other: int) -> bool:
    """Whether samples ``index`` and ``other`` of a batched argument are exactly equal."""
    if isinstance(value, torch.Tensor):
        return same(value[index], value[other])
    mine, theirs = list(named_tensors(value[index])), list(named_tensors(value[other]))
    return [path for path, _ in mine] == [path for path, _ in theirs] and all(
        same(a, b) for (_, a), (_, b) in zip(mine, theirs)
    )


def _same_checked(a: _Checked, b: _Checked) -> bool:
    """Exactly equal checked outputs: tensors, or lists of per-sample tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and same(a, b)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def _comparable(
    mine: torch.Tensor, other: Optional[torch.Tensor], batch: int, sample: int, checked: bool
) -> bool:
    """Whether output ``mine`` (for self.inputs) is compared at ``sample`` with ``other`` (for a
    batch of copies of that sample): the checked output always (its first dimension is the
    batch), another output if it is floating-point and its first dimension behaves as the
    batch (the same row for every copy)."""
    if other is None or mine.dim() == 0 or other.dim() != mine.dim():
        return False
    if mine.shape[0] != batch or other.shape[0] != batch:
        return False
    if checked:
        return True
    if not mine.is_floating_point() or other.dtype != mine.dtype:
        return False
    row = other[sample]
    return all(mismatch(other[i], row) is None for i in range(batch))


def _common(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` cut to the extent they share in every dimension (an output padded to
    the longest sequence of its batch is longer for self.inputs than for copies of a short
    sample)."""
    for dim in range(a.dim()):
        size = min(a.shape[dim], b.shape[dim])
        a, b = a.narrow(dim, 0, size), b.narrow(dim, 0, size)
    return a, b
