"""Embedding probes: which lookups of token ids are followed, and where their positions go.

A probe must never attribute a lookup to the wrong sample or position: the batch check reads
its first dimension as the samples, the sequence checks read aligned probes' positions.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from checkrunner import NO_GPU, NO_RUNNING_STATISTICS, CheckTestCase, make_case
from torch import nn

from dltestkit import ModelTests, SequenceModelTests
from dltestkit.core.contract import checks_of
from dltestkit.models.probes import Probe, probe_forward

BATCH, LENGTH, VOCAB, WIDTH = 4, 6, 20, 8


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))


def probe(forward: Callable[..., Any], inputs: Any) -> Tuple[Any, List[Probe]]:
    return probe_forward(lambda batch: forward(batch), inputs, BATCH)


EMBEDDING = nn.Embedding(VOCAB, WIDTH)


class ProbeTestCase(CheckTestCase):
    def assertFollows(self, found: Probe, output: torch.Tensor) -> None:
        """The model gets the probe's values, in a tensor of its own, which it may change in
        place (autograd refuses that on a leaf that requires its gradient), and which passes
        each value's gradient to the probe."""
        self.assertTrue(torch.equal(output.detach(), found.tensor.detach()))
        self.assertIsNot(output, found.tensor)
        output.add_(1.0)
        (grad,) = torch.autograd.grad(
            (output * torch.arange(output.numel()).view_as(output)).sum(), found.tensor
        )
        self.assertTrue(torch.equal(grad, torch.arange(output.numel()).view_as(output).float()))


class Lookups(ProbeTestCase):
    def test_the_input_itself_gives_an_aligned_probe(self) -> None:
        output, probes = probe(EMBEDDING, ids())
        self.assertEqual(len(probes), 1)
        self.assertTrue(probes[0].aligned)
        self.assertFollows(probes[0], output)

    def test_a_transposed_view_gives_an_aligned_probe_in_the_input_layout(self) -> None:
        tokens = ids()
        output, probes = probe(lambda t: EMBEDDING(t.t()), tokens)
        (found,) = probes
        self.assertTrue(found.aligned)
        self.assertEqual(tuple(found.tensor.shape), (BATCH, LENGTH, WIDTH))
        self.assertEqual(tuple(output.shape), (LENGTH, BATCH, WIDTH))
        self.assertTrue(torch.equal(found.tensor.detach(), EMBEDDING(tokens).detach()))
        (grad,) = torch.autograd.grad(output[2, 1].sum(), found.tensor)
        self.assertEqual(grad.ne(0).any(-1).nonzero().tolist(), [[1, 2]])  # sample 1, position 2

    def test_a_slice_is_followed_by_sample_but_not_aligned(self) -> None:
        _, probes = probe(lambda t: EMBEDDING(t[:, 1:]), ids())
        (found,) = probes
        self.assertFalse(found.aligned)
        self.assertEqual(tuple(found.tensor.shape), (BATCH, LENGTH - 1, WIDTH))

    def test_a_sliced_transpose_is_followed_with_the_batch_moved_first(self) -> None:
        output, probes = probe(lambda t: EMBEDDING(t.t()[1:]), ids())
        (found,) = probes
        self.assertFalse(found.aligned)
        self.assertEqual(tuple(found.tensor.shape), (BATCH, LENGTH - 1, WIDTH))
        (grad,) = torch.autograd.grad(output[:, 3].sum(), found.tensor)
        self.assertEqual(grad.ne(0).any(-1).any(-1).nonzero().flatten().tolist(), [3])

    def test_a_reshape_that_mixes_samples_gives_no_probe(self) -> None:
        _, probes = probe(lambda t: EMBEDDING(t.reshape(LENGTH, BATCH)), ids())
        self.assertEqual(probes, [])

    def test_ids_transformed_into_a_new_tensor_give_no_probe(self) -> None:
        _, probes = probe(lambda t: EMBEDDING(t.clamp(0, VOCAB - 1)), ids())
        self.assertEqual(probes, [])

    def test_inputs_sharing_memory_are_told_apart(self) -> None:
        """labels and input_ids cut from one tensor: the lookup of input_ids is not
        attributed to labels, whose elements are one position further."""
        both = torch.randint(0, VOCAB, (BATCH, LENGTH + 1))
        inputs = {"labels": both[:, 1:], "input_ids": both[:, :-1]}
        _, probes = probe(lambda batch: EMBEDDING(batch["input_ids"]), inputs)
        self.assertEqual([(p.key, p.aligned) for p in probes], [("input_ids", True)])

    def test_an_expanded_input_used_as_it_is_gives_a_probe(self) -> None:
        _, probes = probe(EMBEDDING, ids()[:1].expand(BATCH, LENGTH))
        self.assertEqual([p.aligned for p in probes], [True])


BAG = nn.EmbeddingBag(VOCAB, WIDTH, mode="mean")


class Bags(ProbeTestCase):
    def test_a_bag_per_sample_gives_a_probe_per_bag(self) -> None:
        output, probes = probe(BAG, ids())
        (found,) = probes
        self.assertFalse(found.aligned)
        self.assertFollows(found, output)
        self.assertEqual(tuple(found.tensor.shape), (BATCH, WIDTH))

    def test_flat_ids_with_offsets_give_a_probe_when_each_bag_is_one_sample(self) -> None:
        offsets = torch.arange(0, BATCH * LENGTH, LENGTH)
        _, probes = probe(lambda t: BAG(t.flatten(), offsets), ids())
        self.assertEqual(len(probes), 1)
        aten: Dict[str, Any] = {}

        def direct(t: torch.Tensor) -> torch.Tensor:
            aten["output"] = torch.embedding_bag(BAG.weight, t.flatten(), offsets, False, 1)
            return aten["output"][0]  # type: ignore[no-any-return]

        _, probes = probe(direct, ids())
        self.assertEqual(len(probes), 1)

    def test_bags_that_cut_across_samples_give_no_probe(self) -> None:
        offsets = torch.arange(0, BATCH * LENGTH, LENGTH)[:BATCH] + 1  # off by one position
        offsets[0] = 0
        _, probes = probe(lambda t: BAG(t.flatten(), offsets), ids())
        self.assertEqual(probes, [])

    def test_differentiated_per_sample_weights_keep_their_path(self) -> None:
        bag = nn.EmbeddingBag(VOCAB, WIDTH, mode="sum")
        inputs = (ids(), torch.rand(BATCH, LENGTH))
        _, probes = probe(lambda batch: bag(batch[0], per_sample_weights=batch[1]), inputs)
        self.assertEqual([p.embedded for p in probes], [False])  # the weights only


# -- through the checks -------------------------------------------------------------------
class SeqFirstLM(nn.Module):
    """PyTorch's word_language_model: (batch, seq) ids, embedded as ids.t() for a seq-first
    LSTM; ``bidirectional`` sees the future, ``reshape`` turns ids seq-first with a reshape."""

    def __init__(self, bidirectional: bool = False, reshape: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.rnn = nn.LSTM(WIDTH, WIDTH, bidirectional=bidirectional)
        self.head = nn.Linear(WIDTH * (2 if bidirectional else 1), VOCAB)
        self.reshape = reshape

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq_first = tokens.reshape(tokens.shape[1], -1) if self.reshape else tokens.t()
        hidden, _ = self.rnn(self.embed(seq_first))
        return self.head(hidden).transpose(0, 1)


class BagClassifier(nn.Module):
    def __init__(self, centred: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, WIDTH, mode="mean")
        self.head = nn.Linear(WIDTH, 2)
        self.centred = centred

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.bag(tokens)
        return self.head(pooled - pooled.mean(0) if self.centred else pooled)


def case(mixin: type, model: Callable[[], nn.Module], **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model, self.inputs = model(), ids()
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(mixin, set_up)


class ThroughTheChecks(CheckTestCase):
    def test_a_seq_first_language_model_is_checked_for_causality(self) -> None:
        def lm(**options: Any) -> type:
            return case(
                SequenceModelTests, lambda: SeqFirstLM(**options), sequence_dim=1, causal=True
            )

        for name in ("test_batch_independence", "test_causality"):
            with self.subTest(name):
                self.assertPasses(lm(), name)
        self.assertFailsWith(
            lm(bidirectional=True),
            "test_causality",
            "the output at position 0 depends on self.inputs (through its embedding) at position 1",
        )

    def test_ids_reshaped_instead_of_transposed_fail_by_value(self) -> None:
        self.assertFailsWith(
            case(ModelTests, lambda: SeqFirstLM(reshape=True)),
            "test_batch_independence",
            "sample 0's output changes with the other samples of the batch",
            "Only outputs were compared",
        )

    def test_an_embedding_bag_classifier_is_checked_through_its_bags(self) -> None:
        self.assertPasses(case(ModelTests, BagClassifier), "test_batch_independence")
        self.assertFailsWith(
            case(ModelTests, lambda: BagClassifier(centred=True)),
            "test_batch_independence",
            "sample 0's self.inputs (through its embedding) gets a gradient from the outputs "
            "of the other samples",
        )

    def test_embeddings_changed_in_place_by_the_model_pass_every_check(self) -> None:
        # BLIP's text embeddings, like BERT's in older code, add positions with +=; the
        # probes' leaves, given to the model as they were, made four checks raise "a leaf
        # Variable that requires grad is being used in an in-place operation"
        class InPlace(nn.Module):
            def __init__(self, transposed: bool = False) -> None:
                super().__init__()
                self.tokens, self.positions = (
                    nn.Embedding(VOCAB, WIDTH),
                    nn.Embedding(LENGTH, WIDTH),
                )
                self.bag, self.head = nn.EmbeddingBag(VOCAB, WIDTH), nn.Linear(WIDTH, 5)
                self.transposed = transposed

            def forward(self, tokens: torch.Tensor) -> torch.Tensor:
                embedded = self.tokens(tokens.t() if self.transposed else tokens)
                if self.transposed:
                    embedded = embedded.transpose(0, 1)
                embedded += self.positions(torch.arange(tokens.shape[1], device=tokens.device))
                pooled = self.bag(tokens)
                pooled *= 2.0
                return self.head(torch.tanh(embedded) + pooled[:, None])

        for transposed in (False, True):
            tested = case(
                ModelTests,
                functools.partial(InPlace, transposed),
                expected_output_shape=(BATCH, LENGTH, 5),
                make_model=functools.partial(InPlace, transposed),
            )
            for name in checks_of(tested):
                with self.subTest(name, transposed=transposed):
                    self.assertPasses(tested, name, allowed_skips=[NO_GPU, NO_RUNNING_STATISTICS])

    def test_embedding_bag_lookups_under_f_embedding_bag_are_followed(self) -> None:
        class Functional(BagClassifier):
            def forward(self, tokens: torch.Tensor) -> torch.Tensor:
                return self.head(F.embedding_bag(tokens, self.bag.weight, mode="max"))

        self.assertPasses(case(ModelTests, Functional), "test_all_parameters_updated")
        self.assertPasses(case(ModelTests, Functional), "test_batch_independence")
