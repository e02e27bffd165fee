"""The model wing: ``ModelTests`` and ``SequenceModelTests``, compositions of one feature mixin
per check (or pair of checks), each in its module with the options only it reads.

- ``shape.py``: test_output_shape
- ``devices.py``: test_device_moving, test_device_moving_on_gpu (``meta.py``: the meta watch)
- ``batch.py``: test_batch_independence (``dependence.py``, ``probes.py``: exact dependence)
- ``training.py``: test_all_parameters_updated, test_finite_outputs_and_gradients
- ``determinism.py``: test_eval_deterministic (``randomness.py``: which draws, of which kind)
- ``persistence.py``: test_state_dict_round_trip
- ``dtypes.py``: test_dtype_moving (``dtype_watch.py``: where tensors of other dtypes come from)
- ``inputs.py``: test_inputs_unchanged
- ``modes.py``: test_train_matches_eval
- ``statistics.py``: test_running_statistics
- ``input_use.py``: test_all_inputs_used (``input_parts.py``: the parts of inputs it judges)
- ``reference.py``: test_reference_outputs (``core/references.py``: the reference files)
- ``equivalence.py``: test_reference_model
- ``sequence/``: test_causality, test_padding_invariance
- ``stack/``: the opt-in ``TrainingStackTests`` (test_compile, test_memory_layouts,
  test_autocast, test_activation_checkpointing) and ``ExportTests`` (test_export)

``contract.py`` holds the options every model check reads and how the checks call the model;
``passes.py`` shares the passes several checks need (``_eval_pass``, ``_training_pass``,
``_shared_pass``) between the checks of a test class.
"""

from __future__ import annotations

from typing import ClassVar

from .batch import BatchIndependence
from .determinism import EvalDeterminism
from .devices import DeviceMoving
from .dtypes import DtypeMoving
from .equivalence import ReferenceModel
from .input_use import InputUse
from .inputs import InputsUnchanged
from .modes import ModeAgreement
from .persistence import StateDictRoundTrip
from .reference import ReferenceOutputs
from .sequence.causality import Causality
from .sequence.padding import PaddingInvariance
from .shape import OutputShape
from .stack import ExportTests, TrainingStackTests
from .statistics import RunningStatistics
from .training import Training

__all__ = ["ExportTests", "ModelTests", "SequenceModelTests", "TrainingStackTests"]


class ModelTests(
    OutputShape,
    DeviceMoving,
    BatchIndependence,
    Training,
    EvalDeterminism,
    StateDictRoundTrip,
    DtypeMoving,
    InputsUnchanged,
    ModeAgreement,
    RunningStatistics,
    InputUse,
    ReferenceOutputs,
    ReferenceModel,
):
    """Checks for a model (an ``nn.Module``) on one batch of inputs.

    ``self.inputs`` is passed as the model is called in your code: a tensor as
    ``model(inputs)``, a tuple or list as positional arguments ``model(*inputs)``, a dict as
    keyword arguments ``model(**inputs)`` (what a tokenizer returns). An argument that is a
    list of tensors or of dicts of tensors carries the batch as the list, one item per sample
    (``(images, targets)`` for torchvision's detection models).
    """

    _suite: ClassVar[str] = "ModelTests"


class SequenceModelTests(ModelTests, Causality, PaddingInvariance):
    """Checks for a model over sequences: every ``ModelTests`` check, plus causality and
    padding invariance.

    Positions run along ``sequence_dim`` of the inputs and of the checked output (1 for
    ``(batch, seq, ...)``). Keep sequences short in tests (8 to 16 positions): the sequence
    checks back-propagate and run the model once per position.
    """

    _suite: ClassVar[str] = "SequenceModelTests"
