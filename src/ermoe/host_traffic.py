"""Which operations make an accelerator wait for the host, found without an accelerator.

A GPU runs ahead of Python as long as nothing reads a device value back (``.item()``, ``.tolist()``, ``bool(t)``,
a data-dependent shape such as ``nonzero``) and nothing copies host memory to the device in the middle of a step:
each of those stalls the queue. :class:`HostTraffic` is a ``TorchDispatchMode`` that sees every ATen call and
records those that would, with the ermoe source line that made them (a ``non_blocking`` copy from the host is
taken to come from pinned memory, as the loaders' batches do on CUDA, and so to make nothing wait):

    with HostTraffic() as traffic:          # on a CPU: counts what a GPU would stall on
        train_step(batch)
    print(traffic.summary())                # "3 host reads: ermoe/trainer.py:424 (_micro_step) ..."

On a CPU-only machine it runs on real CPU tensors (count only: a CPU "device" never waits) or on fake CUDA tensors
(:class:`FakeCuda`), where it also refuses a host tensor mixed into
device work. ``strict=True`` raises :class:`HostTrafficError` at the first event whose ermoe frame is not in
``allow`` (a set of ``(path suffix, function)`` pairs, see :data:`INHERENT`); an allowed host read of a fake tensor
answers 0 so that the code after it runs on. ``torch.cuda.set_sync_debug_mode("error")`` is the same check on a
real GPU (tests/test_cuda.py).
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Host reads: the value of a device tensor on the host.
_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
# Outputs whose shape depends on the data: the host must know a count before it can allocate them.
_DYNAMIC = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.argwhere.default, aten.nonzero_static.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}

# Host traffic a GPU step keeps by design (docs/performance.md, "Host syncs"): (path suffix, function) of the
# innermost ermoe frame.
INHERENT: dict[tuple[str, str], str] = {
    ("ermoe/dispatch.py", "__init__"): "capacity drops and ERMoE's score threshold: the kept count sizes the "
                                       "permutation (V-MoE, capacity_factor, threshold)",
    ("ermoe/models/regional.py", "forward_features"): "the regional brain model indexes each region's experts",
    ("ermoe/models/text.py", "forward"): "the text tower's padding index",
    ("ermoe/distributed.py", "run_experts"): "expert parallelism: the all-to-all's split sizes live on the host",
}


class HostTrafficError(AssertionError):
    """An operation that would make the device wait for the host, outside the allowed list."""


@dataclass
class Event:
    kind: str  # "host read", "data-dependent shape", "host-to-device copy", "device-to-host copy", "device mismatch"
    op: str
    where: str  # "ermoe/file.py:line (function)" or "outside ermoe"
    key: tuple[str, str] | None  # (path suffix, function) of that frame

    def __str__(self) -> str:
        return f"{self.kind} ({self.op}) at {self.where}"


def _ermoe_frame() -> tuple[str, tuple[str, str] | None]:
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/ermoe/" in path and not path.endswith("/ermoe/host_traffic.py"):
            suffix = "ermoe/" + path.rsplit("/ermoe/", 1)[1]
            return f"{suffix}:{frame.lineno} ({frame.name})", (suffix, frame.name)
    return "outside ermoe", None


def _device_of(x) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


def _devices(args, kwargs) -> list[tuple[torch.device, int]]:
    out = []
    for a in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(a, torch.Tensor):
            out.append((a.device, a.dim()))
    return out


class HostTraffic(TorchDispatchMode):
    """Records (and with ``strict`` refuses) host reads, data-dependent shapes and host<->device copies.

    ``device``: the device type the work is meant for ("cuda"); copies between it and "cpu" are events, and so is a
    CPU tensor of more than 0 dims in an op on that device (a fake-tensor run would raise a device mismatch; here it
    is named). ``device="cpu"``: real CPU work, whose reads a GPU would wait for, counted. ``allow``: ``(path suffix, function)`` pairs whose events are recorded but not refused (default: the
    inherent ones, :data:`INHERENT`).
    """

    def __init__(self, device: str = "cuda", strict: bool = True,
                 allow: set[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.device, self.strict = device, strict
        self.allow = set(INHERENT) if allow is None else set(allow)
        self.events: list[Event] = []
        self._lists = _ListReads(self)

    def __enter__(self):
        self._lists.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._lists.__exit__(*exc)

    def _record(self, kind: str, func) -> bool:
        where, key = _ermoe_frame()
        event = Event(kind, func if isinstance(func, str) else str(func.name()), where, key)
        self.events.append(event)
        allowed = key is not None and key in self.allow
        if self.strict and not allowed:
            raise HostTrafficError(f"{event}: the device would wait for the host here")
        return allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._lists.inside:  # a tolist() already recorded as one read
            return func(*args, **kwargs)
        if func in _READS or func in _DYNAMIC or _mask_index(func, args) or (
                func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            source = args[0]
            on_host = isinstance(source, torch.Tensor) and source.device.type == "cpu" and self.device != "cpu"
            if not on_host:  # (reading a host tensor costs the device nothing)
                self._record("host read" if func in _READS else "data-dependent shape", func)
            if _is_fake_or_meta(source):  # allowed (else _record raised): an answer that lets the code run on
                return _placeholder(func, args)
        elif self.device == "cpu":  # the work itself is on the host: only reads are counted
            pass
        elif func in _COPIES:
            self._check_copy(func, args, kwargs)
        else:
            self._check_mixed(func, args, kwargs)
        return func(*args, **kwargs)

    def _check_copy(self, func, args, kwargs) -> None:
        src = args[1] if func is aten.copy_.default else args[0]
        if func is aten.copy_.default:
            dst_type = args[0].device.type
        else:
            dst = kwargs.get("device")
            dst_type = src.device.type if dst is None else torch.device(dst).type
        src_type = src.device.type
        if src_type == "cpu" and dst_type == self.device:
            if kwargs.get("non_blocking") or (func is aten.copy_.default and len(args) > 2 and args[2]):
                return  # asynchronous: from pinned memory (the loaders pin on CUDA) the device does not wait
            self._record("host-to-device copy", func)
        elif src_type == self.device and dst_type == "cpu":
            self._record("device-to-host copy", func)

    def _check_mixed(self, func, args, kwargs) -> None:
        devices = _devices(args, kwargs)
        if any(d.type == self.device for d, _ in devices) and any(d.type == "cpu" and dim > 0 for d, dim in devices):
            self._record("device mismatch", func)

    @property
    def host_reads(self) -> int:
        return sum(e.kind in ("host read", "data-dependent shape", "device-to-host copy") for e in self.events)

    def summary(self) -> str:
        if not self.events:
            return "no host traffic"
        counts: dict[str, int] = {}
        for e in self.events:
            counts[str(e)] = counts.get(str(e), 0) + 1
        return f"{len(self.events)} event(s): " + "; ".join(f"{n} x {s}" if n > 1 else s for s, n in counts.items())


class _ListReads(TorchFunctionMode):
    """``Tensor.tolist()``/``numpy()`` read a CPU tensor's memory without an ATen call: seen at the Python level."""

    def __init__(self, traffic: HostTraffic) -> None:
        super().__init__()
        self.traffic, self.inside = traffic, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (torch.Tensor.tolist, torch.Tensor.numpy) or self.inside:
            return func(*args, **kwargs)
        source = args[0]
        if source.device.type != "cpu" or self.traffic.device == "cpu":  # (host memory is free to read)
            self.traffic._record("host read", func.__name__)
        self.inside = True
        try:
            if _is_fake_or_meta(source):  # allowed (else _record raised): zeros of its shape
                return torch.zeros(source.shape, dtype=source.dtype, device="cpu").tolist()
            return func(*args, **kwargs)
        finally:
            self.inside = False


def _is_fake_or_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t))


def _is_mask(i) -> bool:
    return isinstance(i, torch.Tensor) and i.dtype == torch.bool


def _mask_index(func, args) -> bool:
    """``x[mask]``: its output's length is the mask's count."""
    return func is aten.index.Tensor and any(_is_mask(i) for i in args[1])


def _placeholder(func, args):
    """What a data-less tensor answers to a read: 0, or the largest output shape (every element selected)."""
    t = args[0]
    if func in _READS:
        return False if t.dtype == torch.bool else 0.0 if t.is_floating_point() else 0
    if func is aten.nonzero.default or func is aten.argwhere.default:
        return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
    if _mask_index(func, args):  # every element selected: a k-dim mask as k long indices over all its elements
        indices = []
        for i in args[1]:
            indices += [torch.zeros(i.numel(), dtype=torch.long, device=i.device)] * i.dim() if _is_mask(i) else [i]
        return func(t, indices)
    if func is aten.masked_select.default:
        return torch.empty(t.numel(), dtype=t.dtype, device=t.device)
    raise HostTrafficError(f"{func} of a tensor without data: no placeholder answer")


class FakeCuda:
    """Fake CUDA tensors on a machine without a GPU (``torch._subclasses.fake_tensor.FakeTensorMode``): inside
    ``with FakeCuda() as fake:``, tensors made without a device are fake CUDA tensors that carry shapes, dtypes and
    devices but no data, and a CPU tensor mixed into CUDA work raises. ``fake.module(m)`` turns a module built on
    the CPU (real weights: its initialisation may read values, as timm's does) into fake CUDA in place;
    ``fake.tensor(t)`` a tensor. ``dtype``: the default floating dtype meanwhile. ``default_device=False``: tensors
    made without a device stay (fake) CPU tensors, as on a real GPU machine. Autograd's backward needs a real CUDA
    context: run backward on the ``meta`` device instead."""

    def __init__(self, dtype: torch.dtype | None = None, default_device: bool = True) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode, self.dtype = FakeTensorMode(allow_non_fake_inputs=True), dtype
        self.default_device = default_device
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "FakeCuda":
        self._saved = torch.get_default_dtype()
        self._stack.enter_context(self.mode)
        if self.default_device:
            self._stack.enter_context(torch.device("cuda"))
        if self.dtype is not None:
            torch.set_default_dtype(self.dtype)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_default_dtype(self._saved)
        self._stack.close()

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        with self.mode:
            return self.mode.from_tensor(t).to("cuda")

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    fake = torch.nn.Parameter(self.tensor(p.detach()), requires_grad=p.requires_grad)
                    m._parameters[name] = fake
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = self.tensor(b)
        return module
