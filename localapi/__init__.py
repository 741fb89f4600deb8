"""A local OpenAI-compatible server for gridtune's embedded mode, tests and benchmarks.

    with localapi.running(rpm=600, fault_rate=0.1) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-local")

Chat completions for a local model name (`smollm2-135m`, a model or adapter folder) come from the
real model (inference.py, continuous batching); any other name gets deterministic simulated text
that reflects the request. RPM/TPM budgets, faults, files and fine-tuning jobs behave like
OpenAI's. Also: `python -m localapi --help`.
"""

from .background import ServerHandle, running
from .config import FAULT_KINDS, FINETUNE_OUTCOMES, ServerConfig

__all__ = ["FAULT_KINDS", "FINETUNE_OUTCOMES", "ServerConfig", "ServerHandle", "running"]
