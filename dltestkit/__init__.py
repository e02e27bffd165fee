"""dltestkit: ready-made unittest checks for PyTorch datasets, models and trainers.

Combine a mixin with ``unittest.TestCase`` (mixin first) and write only ``setUp``::

    class TestMyModel(ModelTests, unittest.TestCase):
        def setUp(self):
            self.model = MyModel()
            self.inputs = torch.randn(4, 1, 32, 32)
"""

from ._base import ContractError
from ._random import make_deterministic
from .dataset import DatasetTests
from .distributed import DistributedModelTests
from .distributed_trainer import DistributedTrainerTests
from .launch import DistributedError, run_distributed
from .model import ModelTests
from .sequence import SequenceModelTests
from .trainer import TrainerTests

__all__ = [
    "ContractError",
    "DatasetTests",
    "DistributedError",
    "DistributedModelTests",
    "DistributedTrainerTests",
    "ModelTests",
    "SequenceModelTests",
    "TrainerTests",
    "make_deterministic",
    "run_distributed",
]
__version__ = "0.1.0"
