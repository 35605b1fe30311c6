"""Worker-side helper of the vLLM engine (`worker_extension_cls`), for an engine core in its own process on CPU.

vLLM's RL weight transfer has no CPU backend, and tensors inside `collective_rpc` arguments do not survive the
hop from the engine core to its CPU worker process. The trainer therefore sends each tensor as
`(name, dtype, shape, raw bytes)`; this method, mixed into vLLM's worker class, rebuilds the tensors and loads them
with the worker's own `reload_weights` (checkpoint names, repacked layers handled by vLLM).
"""

from __future__ import annotations


def tensor_to_wire(name: str, t) -> tuple[str, str, list[int], bytes]:
    import torch

    t = t.detach().contiguous().cpu()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()


def tensor_from_wire(item) -> tuple:
    import torch

    name, dtype, shape, raw = item
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return name, flat.view(getattr(torch, dtype)).reshape(shape)


class WeightsFromBytes:
    """Mixed into vLLM's worker: `collective_rpc("mmrlsd_load_weights", args=([wire items],))`."""

    def mmrlsd_load_weights(self, items: list) -> None:
        self.reload_weights(weights_iterator=[tensor_from_wire(i) for i in items], is_checkpoint_format=True)
