"""The one device / dtype / fallback policy.

Only ``generate()``, ``load_pipeline()`` and the CLI call into this module; pipelines and
components never move themselves. (The loaders also take :func:`dtype_kwargs` from here: the
name of the dtype keyword that the installed diffusers / transformers expect.) Decisions (and why):

- ``device="auto"`` picks ``cuda`` -> ``mps`` -> ``cpu``, and logs the choice.
- ``dtype="auto"`` is float16 on CUDA (what DeepFloyd IF and Karlo ship and run in) and
  float32 everywhere else (diffusers' PHILOSOPHY: load on CPU in float32 unless told).
- An explicit device that is not available is an error, never a silent move.
- With ``device="auto"``, CUDA out-of-memory at load or at run falls back first to model CPU
  offload, then to the CPU in float32, each time with a warning that says so
  (:func:`run_with_fallback`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, TypeVar

import torch

logger = logging.getLogger("imagen_lite")

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

T = TypeVar("T")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> the best available device; an explicit one must exist."""
    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device={device!r} is not valid; use one of {DEVICES} (or 'cuda:N')")
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device={device!r} is not valid; use one of {DEVICES} (or 'cuda:N')")
    if kind == "auto":
        chosen = "cuda" if cuda_available() else "mps" if mps_available() else "cpu"
        logger.info("device='auto' resolved to %r", chosen)
        return torch.device(chosen)
    if kind == "cuda" and not cuda_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use 'cpu' or 'auto'")
    if kind == "mps" and not mps_available():
        raise ValueError(f"device={device!r} was requested but MPS is not available here; use 'cpu' or 'auto'")
    return torch.device(device)


def dtype_kwargs(dtype, library: str = "diffusers") -> dict:
    """The dtype keyword for ``from_pretrained`` of ``library`` (``"diffusers"`` or
    ``"transformers"``): ``{"dtype": dtype}`` where the installed release takes that name, else
    ``{"torch_dtype": dtype}``.

    Both libraries renamed ``torch_dtype`` to ``dtype`` and warn (FutureWarning) on the old
    name: transformers by 5.0, diffusers in huggingface/diffusers#14205 (2026). The releases
    this package allows (diffusers >= 0.35, transformers >= 4.44) include ones that know only
    ``torch_dtype``. transformers is told apart by its major version; diffusers by the helper
    that PR added (``diffusers.utils.deprecation_utils._resolve_dtype``): were it renamed, the
    fallback is the old keyword, which still loads (with the warning) until diffusers 1.0.
    """
    if library == "transformers":
        import transformers

        new = int(transformers.__version__.split(".")[0]) >= 5
    elif library == "diffusers":
        from diffusers.utils import deprecation_utils

        new = hasattr(deprecation_utils, "_resolve_dtype")
    else:
        raise ValueError(f"library={library!r} is not known; use 'diffusers' or 'transformers'")
    return {"dtype" if new else "torch_dtype": dtype}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"`` -> float16 on CUDA, float32 elsewhere; names from :data:`DTYPES`."""
    if dtype is None or dtype == "auto":
        chosen = torch.float16 if device.type == "cuda" else torch.float32
        logger.info("dtype='auto' resolved to %s on %s", chosen, device)
        return chosen
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; use one of {sorted(set(DTYPES))} or 'auto'")
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; use 'auto' or one of {sorted(DTYPES)}")


# CPU flags that make ``torch.autocast("cpu", dtype=torch.bfloat16)`` pay: AVX-512 BF16 or AMX.
# Without them bf16 autocast runs ~10x slower than float32 on the issue #10 configurations
# (`python scripts/budget_speed.py` on an AVX2-only EPYC, twenty-seventh session: 17.0 against
# 1.64 s per step).
FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU runs bf16 autocast fast (one of :data:`FAST_BF16_CPU_FLAGS`).

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``; read from there when None.

    Returns:
        True or False from the ``flags`` lines; None where they cannot be read (not Linux).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return any(flag in flags for flag in FAST_BF16_CPU_FLAGS)


def is_cuda_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(err)


def place(pipe, device: torch.device, dtype: torch.dtype, offload: bool = False):
    """Move a pipeline to ``device``/``dtype`` (or enable model CPU offload there)."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    if any(m.dtype != dtype for m in modules):  # loaders already read weights in ``dtype``
        pipe.to(dtype=dtype)
    if offload and device.type != "cpu":  # offloading to the CPU from the CPU means nothing
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def run_with_fallback(
    fn: Callable[[torch.device, torch.dtype, bool], T],
    device: torch.device,
    dtype: torch.dtype,
    auto: bool,
) -> T:
    """Call ``fn(device, dtype, offload)``; on CUDA OOM with ``auto`` retry with model CPU
    offload, then on the CPU in float32, warning each time. Without ``auto`` the error stands."""
    attempts = [(device, dtype, False)]
    if auto and device.type == "cuda":
        attempts += [(device, dtype, True), (torch.device("cpu"), torch.float32, False)]
    last: BaseException | None = None
    for n, (dev, dt, offload) in enumerate(attempts):
        if n > 0:
            what = "model CPU offload" if offload else "the CPU in float32"
            warnings.warn(f"CUDA ran out of memory ({last}); falling back to {what}", RuntimeWarning, stacklevel=3)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        try:
            return fn(dev, dt, offload)
        except Exception as err:  # noqa: BLE001 -- only OOM is retried, everything else re-raised
            if not (auto and is_cuda_oom(err)) or n == len(attempts) - 1:
                raise
            last = err
    raise AssertionError("unreachable")
