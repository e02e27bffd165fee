"""The global settings a model, a trainer or a setUp can change, and which the checks put back:
PyTorch's default dtype, grad mode, deterministic algorithms, anomaly detection and float32
matmul precision, the environment variables (but those torch sets itself) and the working directory.

``Settings.capture()`` notes them, ``restore()`` puts them back, ``changes()`` says in words
which differ from another capture ("grad mode turned off (torch.set_grad_enabled(False))").
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["Settings"]

#: Environment variables torch sets itself on first use, not settings of the user's code: the
#: first import of torch._dynamo (which a torch operation may do lazily) notes its cache
#: folder in TORCHINDUCTOR_CACHE_DIR; inductor notes Triton's paths.
_TORCH_OWN = frozenset(
    {
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "TRITON_PTXAS_PATH",
        "TRITON_LIBDEVICE_PATH",
    }
)


def _environ() -> Dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in _TORCH_OWN}


def _cwd() -> Optional[str]:
    try:
        return os.getcwd()
    except OSError:  # the working directory was removed
        return None


def _on_off(value: bool) -> str:
    return "on" if value else "off"


@dataclass(frozen=True)
class Settings:
    """The global settings at one moment."""

    default_dtype: torch.dtype
    grad_enabled: bool
    deterministic: Tuple[bool, bool]  # use_deterministic_algorithms, and its warn_only
    anomaly: Tuple[bool, bool]  # detect_anomaly, and its check_nan
    matmul_precision: str
    environ: Mapping[str, str]
    cwd: Optional[str]

    @classmethod
    def capture(cls) -> "Settings":
        return cls(
            default_dtype=torch.get_default_dtype(),
            grad_enabled=torch.is_grad_enabled(),
            deterministic=(
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
            ),
            anomaly=(torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
            matmul_precision=torch.get_float32_matmul_precision(),
            environ=_environ(),
            cwd=_cwd(),
        )

    def restore(self) -> None:
        """Put every setting back as it was captured (those that differ only)."""
        now = Settings.capture()
        if now.default_dtype != self.default_dtype:
            torch.set_default_dtype(self.default_dtype)
        if now.grad_enabled != self.grad_enabled:
            torch.set_grad_enabled(self.grad_enabled)
        if now.deterministic != self.deterministic:
            torch.use_deterministic_algorithms(
                self.deterministic[0], warn_only=self.deterministic[1]
            )
        if now.anomaly != self.anomaly:
            torch.autograd.set_detect_anomaly(self.anomaly[0], check_nan=self.anomaly[1])
        if now.matmul_precision != self.matmul_precision:
            torch.set_float32_matmul_precision(self.matmul_precision)
        if now.environ != self.environ:
            for name in set(now.environ) - set(self.environ):
                del os.environ[name]
            for name, value in self.environ.items():
                if now.environ.get(name) != value:
                    os.environ[name] = value
        if self.cwd is not None and now.cwd != self.cwd:
            with contextlib.suppress(OSError):  # removed meanwhile: nothing to go back to
                os.chdir(self.cwd)

    def changes(self, now: "Settings", environ: bool = True) -> List[str]:
        """What differs in ``now`` from these settings, in words, with the call that does it;
        the environment variables too if ``environ``."""
        found = []
        if now.default_dtype != self.default_dtype:
            found.append(
                f"the default dtype set to {now.default_dtype} (torch.set_default_dtype; it "
                f"was {self.default_dtype})"
            )
        if now.grad_enabled != self.grad_enabled:
            found.append(
                f"grad mode turned {_on_off(now.grad_enabled)} "
                f"(torch.set_grad_enabled({now.grad_enabled}))"
            )
        if now.deterministic != self.deterministic:
            found.append(
                f"deterministic algorithms turned {_on_off(now.deterministic[0])}"
                + (" (warn_only)" if now.deterministic[1] else "")
                + f" (torch.use_deterministic_algorithms({now.deterministic[0]}))"
            )
        if now.anomaly != self.anomaly:
            found.append(
                f"anomaly detection turned {_on_off(now.anomaly[0])} "
                f"(torch.autograd.set_detect_anomaly({now.anomaly[0]}))"
            )
        if now.matmul_precision != self.matmul_precision:
            found.append(
                f"the float32 matmul precision set to {now.matmul_precision!r} "
                f"(torch.set_float32_matmul_precision; it was {self.matmul_precision!r})"
            )
        if environ:
            found += _environ_changes(self.environ, now.environ)
        if now.cwd != self.cwd:
            found.append(f"the working directory changed to {now.cwd} (os.chdir)")
        return found


def _environ_changes(before: Mapping[str, str], after: Mapping[str, str]) -> List[str]:
    changed: Dict[str, str] = {}
    for name in sorted(set(before) | set(after)):
        if name not in after:
            changed[name] = "removed"
        elif before.get(name) != after[name]:
            changed[name] = f"set to {after[name][:40]!r}"
    return [f"the environment variable {name} {what}" for name, what in changed.items()]
