"""Import-time noise of third-party packages that asymlora silences, before peft is first imported.

peft imports bitsandbytes whenever it is installed (the ``quant`` extra). bitsandbytes 0.50 then
- warns fourteen times that ``torch.jit.script_method`` is deprecated (its own decorators, under torch 2.13),
  which Ray's client actors print in every federated simulation, and
- logs, on CPUs with AVX512-BF16, that its optional ``kernels`` package (fetched from the model hub) is
  missing; that only concerns the speed of 4-bit matmuls on CPU, yet it would print on every command.
Both concern bitsandbytes' internals, not the user's code: import it here once with exactly those two
messages filtered, nothing else.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
)
if importlib.util.find_spec("bitsandbytes") is not None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning)
        import bitsandbytes  # noqa: F401
