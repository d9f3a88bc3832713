"""Qwen3-VL in JAX: load a checkpoint, prepare image + prompt inputs, sample (streaming or lax.scan)."""

from .inputs import VLMInputs, prepare_inputs
from .sampling import SampleResult, SamplingConfig, sample, sample_streaming
from .weights import load_model

__all__ = ["load_model", "prepare_inputs", "SamplingConfig", "VLMInputs", "SampleResult", "sample",
           "sample_streaming"]
