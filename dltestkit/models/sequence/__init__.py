"""The sequence checks of ``SequenceModelTests``: ``causality.py`` (test_causality) and
``padding.py`` (test_padding_invariance), over the options and helpers of ``contract.py``."""
