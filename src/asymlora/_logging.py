"""Log records of third-party packages that asymlora drops, installed before peft is first imported."""

from __future__ import annotations

import logging

# bitsandbytes 0.50 (imported by peft whenever it is installed) logs at import, on CPUs with AVX512-BF16,
# that its optional `kernels` package (fetched from the model hub) is missing. It concerns only the speed of
# 4-bit matmuls on CPU, yet it would print on every `asymlora` command: drop that one record, nothing else.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
)
