"""The op counter of the CPU proxies (`cpu_proxies.py`, `optimizer_ops.py`): a TorchDispatchMode
that counts the ops dispatched that launch a kernel (each about one GPU kernel) and the bytes they
write, leaving out views, allocations and metadata."""

import collections

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    InterpretedFunction = None

aten = torch.ops.aten
COPY_OPS = {
    aten._to_copy.default,
    aten.copy_.default,
    aten.clone.default,
    aten._copy_from.default,
    aten._copy_from_and_resize.default,
    aten.lift_fresh_copy.default,
}
FILL_OPS = {
    aten.zero_.default,
    aten.fill_.Scalar,
    aten.fill_.Tensor,
    aten.zeros.default,
    aten.zeros_like.default,
    aten.new_zeros.default,
    aten.full.default,
    aten.new_full.default,
    aten.ones_like.default,
    aten.ones.default,
    aten.new_ones.default,
    aten.full_like.default,
}
# No kernel: allocation, metadata, views (tagged or aliasing their input)
FREE_OPS = {
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.empty_strided.default,
    aten.new_empty_strided.default,
    aten.detach.default,
    aten.lift_fresh.default,
    aten.set_.source_Storage,
    aten.resize_.default,
    aten.sym_size.int,
    aten.sym_stride.int,
    aten.sym_numel.default,
    aten.is_same_size.default,
    aten.sym_storage_offset.default,
    aten.promote_types.default,
    aten._unsafe_view.default,
    aten._local_scalar_dense.default,
}
FREE_NAMESPACES = {"prim", "profiler"}  # metadata, profiler marks


def _is_free(func) -> bool:
    """No kernel: a view (tagged or aliasing its input), an allocation or metadata."""
    views = func.is_view or torch.Tag.view_copy in func.tags or torch.Tag.inplace_view in func.tags
    return views or func in FREE_OPS or func.namespace in FREE_NAMESPACES


def _nbytes(out) -> int:
    return sum(
        t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
    )


class OpCounter(TorchDispatchMode):
    """Counts the non-view ops dispatched (launches), the bytes written by copies and fills, and by all
    of them (`bytes_written`: outputs plus the arguments their schema lets them write). Ops of the
    `moonlight` namespace (custom ops wrapping Triton kernels and `torch._grouped_mm`) count by what
    they run: the kernels (Triton's, under the interpreter) and the ops around them."""

    def __init__(self):
        super().__init__()
        self.launches = collections.Counter()
        self.bytes_written = 0
        self.copy_bytes = collections.Counter()
        self.copy_shapes = collections.Counter()
        self.fill_bytes = 0
        self.entered = 0
        self.muted = False  # inside a Triton kernel run by the interpreter: its host copies are no ops

    def __enter__(self):
        self.entered += 1
        if InterpretedFunction is not None and not hasattr(self, "_run"):
            self._run = InterpretedFunction.run
            counter = self

            def run(fn, *args, **kwargs):
                counter.launches["triton." + fn.__name__] += 1
                if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
                    return None  # shapes only: nothing to compute
                counter.muted, muted = True, counter.muted
                try:
                    return counter._run(fn, *args, **kwargs)
                finally:
                    counter.muted = muted

            InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        self.entered -= 1
        if hasattr(self, "_run") and not self.entered:
            InterpretedFunction.run = self._run
            del self._run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.muted:
            return func(*args, **kwargs)
        opdef = OPDEFS.get(func._name) if func.namespace == "moonlight" else None
        if opdef is not None:  # a wrapper: what its body runs counts (the kernel and the ops around it)
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if _is_free(func):
            return out
        self.launches[str(func.overloadpacket)] += 1
        written = [
            a for a, s in zip(args, func._schema.arguments) if s.alias_info is not None and s.alias_info.is_write
        ]
        self.bytes_written += _nbytes([out, written])
        if func in COPY_OPS:
            self.copy_bytes[str(func.overloadpacket)] += _nbytes(out)
            src = args[1] if func is aten.copy_.default else args[0]
            self.copy_shapes[f"{func.overloadpacket} {src.dtype}->{out.dtype} {list(out.shape)}"] += 1
        elif func in FILL_OPS:
            self.fill_bytes += _nbytes(out)
        return out

    def summary(self, top: int = 12) -> dict:
        return {
            "launches": sum(self.launches.values()),
            "copy_bytes": sum(self.copy_bytes.values()),
            "fill_bytes": self.fill_bytes,
            "copies": dict(self.copy_bytes),
            "top_ops": dict(self.launches.most_common(top)),
            "top_copies": dict(self.copy_shapes.most_common(top)),
        }
