"""CPU inference fast paths for the models' nn.Conv2d / nn.Linear layers, switched on by `enable(model)`.

Why (numbers: bench/BENCHMARKS.md, "CPU fast paths (cpu_fast.py)"): PyTorch's eager CPU kernels leave speed on
the table in two places that dominate the UNet's forward.
- A convolution hands oneDNN the plain (out, in, kh, kw) weight, which oneDNN re-packs into its blocked layout
  on every call (under autocast after casting it, every call). For SD's 640/1280-channel convs at 16x16 and
  below that costs 2-8x the convolution itself. The fast conv packs the weight once and keeps it.
- An fp32 Linear goes to MKL's sgemm, slower than oneDNN's matmul on the UNet's shapes (6-32%), and a bf16 one
  first writes the broadcast bias into a fresh output. The fast Linear runs oneDNN's matmul with the bias fused.
Together they take SD1.5/SD2.1's UNet forward from ~1.0x to 0.48-0.90x diffusers' time on a 2-core CPU.

`enable` swaps the class of each nn.Conv2d / nn.Linear (subclasses such as lora.py's LoRA layers included) to a
fast subclass: same parameters, same state-dict keys, same __init__. The fast code sits in the class order just
above nn.Conv2d / nn.Linear, so a subclass's own forward (LoRA: base + up(down(x))) still runs and only its base
computation takes the fast path. It is taken only in CPU inference (no autograd recording, not under
torch.compile, fp32 or bf16); everywhere else the layer is exactly its base class. Cost: one more copy of the
3x3 conv weights while the model runs inference on a CPU (SD1.5: 2.2 GB in fp32, 1.1 GB in bf16);
`enable(model, convs=False)` trades that speed back. Call it once the model is built (after LoRA layers are
applied or merged: apply_lora makes new, plain layers).
"""
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def available() -> bool:
    """Whether this PyTorch build has the oneDNN ops the fast paths call (else enable changes nothing)."""
    return _ONEDNN


def _onednn_dtype(x: torch.Tensor):
    """The dtype oneDNN would compute x's layer in (autocast's if on), or None where the base layer must run."""
    if not _ONEDNN or x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype if dtype in (torch.float32, torch.bfloat16) else None


class _WeightCache:
    """Mixin: a derived copy of the weight (oneDNN-packed, or cast for autocast) and the bias, kept while they are
    unchanged. In-place changes (optimizer step, LoRA merge) bump the tensors' _version; where a weight may be
    replaced instead (.to()/.cuda(), load_state_dict(assign=True)) or copied (deepcopy, pickle: the packed
    tensors are opaque) the cache is dropped."""
    _cache = None  # (key, weight, bias)
    _plain = None  # the class enable() swapped out: what disable() and pickling go back to

    def _cached(self, dtype, derive):
        w, b = self.weight, self.bias
        key = (dtype, w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, derive(w.to(dtype)), None if b is None else b.to(dtype))
        return self._cache[1:]

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def __reduce_ex__(self, protocol):
        # pickle names classes by module path, which the classes made per LoRA layer type have none of:
        # rebuild from the plain class instead (deepcopy comes through here too)
        return _rebuild, (self._plain,), self.__getstate__()


def _rebuild(plain: type):
    cls = _fast_class(plain)
    return cls.__new__(cls)


class _FastConv2d(_WeightCache, nn.Conv2d):
    """Caches oneDNN's packed (blocked) copy of a 3x3 conv's weight. The output comes back channels_last and stays
    so: GroupNorm, SiLU, cat and the SpatialTransformer's flatten take it as is, and oneDNN then skips
    reordering activations too."""
    _plain = nn.Conv2d

    def forward(self, x):
        dtype = _onednn_dtype(x)
        # 1x1 convs are GEMMs PyTorch already runs well; oneDNN's packed op pads with zeros only
        if dtype is None or self.kernel_size == (1, 1) or self.padding_mode != "zeros":
            return super().forward(x)
        w, b = self._cached(dtype, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
            w, self.padding, self.stride, self.dilation, self.groups))
        return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), w, b, self.padding, self.stride, self.dilation,
                                                       self.groups, "none", [], "")


class _FastLinear(_WeightCache, nn.Linear):
    """Matmul through oneDNN with the bias fused. Under autocast the bf16 copy of the weight is cached rather
    than cast on every call (SD1.5: 0.5 GB)."""
    _plain = nn.Linear

    def forward(self, x):
        dtype = _onednn_dtype(x)
        if dtype is None:
            return super().forward(x)
        w, b = (self.weight, self.bias) if dtype == self.weight.dtype else self._cached(dtype, lambda w: w)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, b, "none", [], "")


_FAST = {nn.Conv2d: _FastConv2d, nn.Linear: _FastLinear}  # plain class -> its fast class, made on first use


def _fast_class(plain: type) -> type:
    """The fast class of an nn.Conv2d / nn.Linear (sub)class. For a subclass, (plain, fast base) puts the fast
    forward after the subclass's own in the method order, right above nn.Conv2d / nn.Linear."""
    if plain not in _FAST:
        base = _FastConv2d if issubclass(plain, nn.Conv2d) else _FastLinear
        _FAST[plain] = type(f"Fast{plain.__name__}", (plain, base), {"_plain": plain, "__module__": __name__})
    return _FAST[plain]


def _eligible(m: nn.Module, convs: bool) -> bool:
    if isinstance(m, (_WeightCache, LazyModuleMixin)):  # already fast; lazy ones swap their own class later
        return False
    return isinstance(m, nn.Linear) or (convs and isinstance(m, nn.Conv2d))


def enable(model: nn.Module, convs: bool = True) -> nn.Module:
    """Switch every nn.Linear and (convs=True) nn.Conv2d in `model`, itself included, to its fast path, in place.
    Parameters, buffers and state-dict keys stay as they are. Returns model."""
    for m in model.modules():
        if _eligible(m, convs):
            m.__class__ = _fast_class(type(m))
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo enable: every fast layer in `model` back to its plain class, caches freed. Returns model."""
    for m in model.modules():
        if isinstance(m, _WeightCache):
            m.__dict__.pop("_cache", None)
            m.__class__ = m._plain
    return model


def is_enabled(module: nn.Module) -> bool:
    """Whether this one layer is switched to its fast path."""
    return isinstance(module, _WeightCache)
