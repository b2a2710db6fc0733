"""Training state without pickle: state dicts as JSON plus safetensors, and a process's random states as JSON."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import safetensors.torch
import torch

TENSOR, INT_KEYS = "__tensor__", "__int_keys__"  # markers in the JSON half of a tensor tree


def json_bytes(value: Any) -> bytes:
    """`value` as the JSON text of a checkpoint file."""
    return json.dumps(value, indent=1).encode()


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """`tensors` as a safetensors file."""
    # Contiguous CPU copies: safetensors refuses shared or strided (channels_last) storage.
    return safetensors.torch.save({k: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                                   for k, t in tensors.items()})


def split_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A nested state dict as JSON, each tensor moved into `tensors` and replaced by `{"__tensor__": key}`.

    Integer keys (an optimizer's per-parameter state) are kept as `{"__int_keys__": {...}}`: JSON would turn them
    into strings, and torch's `load_state_dict` would then silently match no parameter.
    """
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value
        return {TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in (TENSOR, INT_KEYS) for k in value):
            return {k: split_tensors(v, tensors) for k, v in value.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {INT_KEYS: {str(k): split_tensors(v, tensors) for k, v in value.items()}}
        raise TypeError(f"a checkpoint can only hold dicts with all-string or all-integer keys, not {list(value)}")
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`; raises KeyError for a tensor that `tensors` lacks."""
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        if set(value) == {INT_KEYS}:
            return {int(k): join_tensors(v, tensors) for k, v in value[INT_KEYS].items()}
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def rng_state() -> dict[str, Any]:
    """This process's random states, as JSON."""
    version, internal, gauss_next = random.getstate()
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": {"key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores `rng_state()`'s output; raises KeyError, TypeError, ValueError or RuntimeError when it is malformed."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(i) for i in internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", np.array(numpy["key"], dtype=np.uint32), int(numpy["pos"]),
                         int(numpy["has_gauss"]), float(numpy["cached_gaussian"])))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and "cuda" in state:
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
