"""dltestkit: ready-made unittest checks for PyTorch datasets, models and trainers.

Combine a mixin with ``unittest.TestCase`` (mixin first) and write only ``setUp``::

    class TestMyModel(ModelTests, unittest.TestCase):
        def setUp(self):
            self.model = MyModel()
            self.inputs = torch.randn(4, 1, 32, 32)
"""

from .core.options import ContractError
from .core.seeds import make_deterministic
from .data import DatasetTests
from .distributed import (
    DistributedError,
    DistributedModelTests,
    DistributedTrainerTests,
    run_distributed,
)
from .models import ExportTests, ModelTests, SequenceModelTests, TrainingStackTests
from .trainers import TrainerTests

__all__ = [
    "ContractError",
    "DatasetTests",
    "DistributedError",
    "DistributedModelTests",
    "DistributedTrainerTests",
    "ExportTests",
    "ModelTests",
    "SequenceModelTests",
    "TrainerTests",
    "TrainingStackTests",
    "make_deterministic",
    "run_distributed",
]
__version__ = "0.1.0"
