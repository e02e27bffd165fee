"""The core every wing builds on: options and checks (``contract``), their validators, seeds,
comparisons, message text, nested paths, the torch-function watches."""
