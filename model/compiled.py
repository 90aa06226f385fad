"""One decoder layer's one-row decode step, compiled ahead of time for the CPU (AOTInductor).

Why: one user decoding alone runs a step of ~30 tensor operations per layer, and on a small model the
operations' own overhead (Python, dispatch, a thread start each) is a third of the step: the weights
are read in about 10 ms of a 15 ms step (SmolLM2-135M, 2-core EPYC). Compiled, a layer is one call:
its norms, rotary turn, cache write and gating fused into a few C++ loops around the same matrix and
attention kernels.

The layer takes its weights as inputs, so one artifact serves every layer of a model, every adapter
and every reload. It is built once per layer shape, torch version and CPU instruction set by
``supportbot model prepare`` (10-20 s) and kept in the model cache as a shared library; a worker loads it
in a millisecond.
Where it is missing or cannot be built (no C++ compiler), the engine runs the same step eagerly.

``torch.compile`` was tried instead: it compiles at every worker start and checks guards on every call
(one layer: 7 s to compile, and the step was slower than eager).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import platform
import re
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.errors import ModelError

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """What the compiled code depends on besides the weights' values."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float

    @classmethod
    def of(cls, config: Any) -> LayerShape | None:
        """The shape of a Llama config's layers, or None where the compiled layer does not apply (an
        activation other than SiLU, a config of another shape)."""
        if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            return None
        try:
            heads = config.num_attention_heads
            return cls(
                hidden=config.hidden_size, heads=heads, kv_heads=config.num_key_value_heads,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                intermediate=config.intermediate_size, eps=float(config.rms_norm_eps),
            )  # fmt: skip
        except AttributeError:  # not a Llama-shaped config: the eager step serves it
            return None


def artifact(folder: Path, shape: LayerShape) -> Path:
    """Where the layer for ``shape`` is kept: one file per shape, torch version, CPU instruction set and
    version of the code below. The runner checks nothing it is given, so a file built from other code or
    for another CPU (AVX512 code on a CPU without it) must never be found."""
    key = f"{astuple(shape)}|{torch.__version__}|{platform.machine()}|{_instruction_set()}|{_code_version()}"
    return folder / f"row-layer-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


# The CPU flags that name instruction sets (x86: sse*, avx*, fma, f16c, bmi*, amx*, *vnni*; ARM: asimd,
# sve*, fp16 ...); the rest of /proc/cpuinfo's flags (mitigations, hypervisor) change with the kernel
# and the host, and would make a worker run eagerly for nothing.
_ISA_FLAG = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|amx|vnni|vpclmul|gfni|vaes|asimd|sve|sme|fp|bf16|i8mm|dotprod)")


@functools.cache
def _instruction_set() -> str:
    """The CPU's instruction sets, which the compiled code may use (it is built with -march=native): from
    /proc/cpuinfo (a millisecond), else the compiler's own probe (a second: it builds test programs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):  # x86, ARM
                return " ".join(sorted({f for f in value.split() if _ISA_FLAG.match(f) or "vnni" in f}))
    except OSError:
        pass
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa())


@functools.cache
def _code_version() -> str:
    """A hash of the code that decides what the library computes and takes."""
    return hashlib.sha256("".join(inspect.getsource(f) for f in (RowLayer, _rms_norm, build)).encode()).hexdigest()


class RowLayer(torch.nn.Module):
    """One layer for one token of one row: the arithmetic of ``Engine._row_step`` with the fp16 copy.

    Inputs: ``hidden`` [1, hidden] fp32; ``turns`` [head_dim / 2, 2], the rotary turn of this position
    as (cos, sin); ``width``, any tensor whose length is the row's new length (a length carried as a
    shape compiles to a size the code can slice with; a number would be fixed at compile time);
    the two norm weights (fp32); the fp16 copies' transposed views of the fused q/k/v, output,
    gate/up and down matrices; the row's key and value buffers [kv_heads, capacity, head_dim], fp32.
    The new key and value are written at ``width - 1``. Returns the new hidden state."""

    def __init__(self, shape: LayerShape) -> None:
        super().__init__()
        self.shape = shape

    def forward(  # type: ignore[override]
        self, hidden: torch.Tensor, turns: torch.Tensor, width: torch.Tensor, norm1: torch.Tensor,
        norm2: torch.Tensor, qkv_t: torch.Tensor, o_t: torch.Tensor, gate_up_t: torch.Tensor,
        down_t: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        s = self.shape
        heads, kv_heads, head_dim = s.heads, s.kv_heads, s.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        w = width.shape[0]
        torch._check(w <= keys.shape[1])
        qkv = torch.mm(_rms_norm(hidden, norm1, s.eps).half(), qkv_t).float()
        # The rows come paired (engine._pair_rotary_rows): turn each pair by the position's angle.
        pairs = qkv[0, : q_size + kv_size].view(heads + kv_heads, head_dim // 2, 2)
        real, imag, cos, sin = pairs[..., 0], pairs[..., 1], turns[..., 0], turns[..., 1]
        qk = torch.stack((real * cos - imag * sin, real * sin + imag * cos), -1).view(heads + kv_heads, head_dim)
        keys.narrow(1, w - 1, 1).copy_(qk[heads:].view(kv_heads, 1, head_dim))
        values.narrow(1, w - 1, 1).copy_(qkv[0, q_size + kv_size :].view(kv_heads, 1, head_dim))
        attn = F.scaled_dot_product_attention(
            qk[:heads].view(1, kv_heads, heads // kv_heads, head_dim), keys.narrow(1, 0, w)[None],
            values.narrow(1, 0, w)[None], scale=head_dim**-0.5,
        )  # fmt: skip
        hidden = hidden + torch.mm(attn.reshape(1, q_size).half(), o_t)
        gate_up = torch.mm(_rms_norm(hidden, norm2, s.eps).half(), gate_up_t)
        half = gate_up.shape[-1] // 2
        return hidden + torch.mm(F.silu(gate_up[:, :half]) * gate_up[:, half:], down_t)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def build(shape: LayerShape, path: Path) -> Path:
    """Export and compile the layer for ``shape`` into the shared library ``path`` (atomic: a loading
    worker never sees half a file). Raises ModelError where the compiler fails."""
    import torch._inductor

    s = shape
    half = torch.float16
    capacity, width = 16, 5  # examples only: both sizes stay free
    args = (
        torch.zeros(1, s.hidden), torch.zeros(s.head_dim // 2, 2), torch.zeros(width, dtype=torch.uint8),
        torch.ones(s.hidden), torch.ones(s.hidden),
        torch.zeros((s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden, dtype=half).t(),
        torch.zeros(s.hidden, s.heads * s.head_dim, dtype=half).t(),
        torch.zeros(2 * s.intermediate, s.hidden, dtype=half).t(),
        torch.zeros(s.hidden, s.intermediate, dtype=half).t(),
        torch.zeros(s.kv_heads, capacity, s.head_dim), torch.zeros(s.kv_heads, capacity, s.head_dim),
    )  # fmt: skip
    width_dim = torch.export.Dim("width", min=1, max=1 << 20)
    capacity_dim = torch.export.Dim("capacity", min=2, max=1 << 20)
    dynamic = (None, None, {0: width_dim}, *([None] * 6), {1: capacity_dim}, {1: capacity_dim})
    path.parent.mkdir(parents=True, exist_ok=True)
    package = path.with_name(f"{path.stem}.tmp-{os.getpid()}.pt2")
    part = path.with_name(f"{path.stem}.tmp-{os.getpid()}.so")
    started = time.monotonic()
    try:
        # Threads as the serving process sets them (SUPPORTBOT_TORCH_THREADS), not fixed to the count of
        # the process that builds.
        threads = torch._inductor.config.patch({"cpp.dynamic_threads": True})
        with torch.no_grad(), warnings.catch_warnings(), threads:
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, nothing to act on
            exported = torch.export.export(RowLayer(shape), args, dynamic_shapes=dynamic)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
        # The package is a zip around one shared library (this layer has no weights of its own). Loaded
        # as a package it would be unpacked into a new temporary folder by every process, and left there.
        with zipfile.ZipFile(package) as archive:
            libraries = [name for name in archive.namelist() if name.endswith(".so")]
            if len(libraries) != 1:
                raise ModelError(f"expected one shared library in the compiled package, found {libraries}")
            part.write_bytes(archive.read(libraries[0]))
        os.replace(part, path)
    except ModelError:
        raise
    except Exception as err:  # the compiler's and export's many error types
        raise ModelError(f"could not compile the one-row decode layer: {err}") from err
    finally:
        package.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    log.info("compiled the one-row decode layer %s in %.1f s: %s", shape, time.monotonic() - started, path)
    return path


_loaded: dict[Path, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}  # a reload reuses the load


def load(path: Path) -> Callable[[list[torch.Tensor]], list[torch.Tensor]] | None:
    """The compiled layer at ``path``: called with the list of ``RowLayer.forward``'s inputs, it returns
    ``[new hidden state]``. None where there is none or it cannot be loaded (the engine then runs the
    step eagerly)."""
    if path in _loaded:
        return _loaded[path]
    if not path.is_file():
        log.info("no compiled one-row decode layer at %s: one-row steps run eagerly "
                 "(`supportbot model prepare` builds it)", path)  # fmt: skip
        return None
    try:
        # The runner takes the inputs as a flat list: 3 us a call, where the packaged model's Python
        # wrapper parses its call spec and flattens the inputs every time (15-25 us; 30 calls a step).
        run = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1).run  # one model instance, CPU
    except Exception as err:  # a damaged file, another torch: eager still works
        log.warning("could not load the compiled one-row decode layer %s (%s): one-row steps run eagerly", path, err)
        return None
    _loaded[path] = run
    return run


def prepare(folder: Path, config: Any) -> Path | None:
    """Build the layer for ``config`` in ``folder`` unless it is there: its path, or None where
    the model's layers do not fit it."""
    shape = LayerShape.of(config)
    if shape is None:
        return None
    path = artifact(folder, shape)
    if not path.is_file():
        build(shape, path)
    return path


def prepare_for(settings: Settings, base: Path) -> str:
    """Build the layer for the model at ``base`` where the engine would use it with ``settings`` (the
    CPU, the bf16 weights with their fp16 one-row copy); a line saying what was done. A build that fails
    is reported, not raised: one-row steps then run eagerly."""
    from transformers import AutoConfig

    from model.engine import cpu_weight_form
    from model.runtime import pick_device

    if settings.cpu_compiled_step == "off":
        return "compiled one-row layer: off (SUPPORTBOT_CPU_COMPILED_STEP=off)"
    if (pick_device(settings.device) != "cpu" or settings.load_in_4bit or settings.cpu_row_weights == "off"
            or cpu_weight_form(settings.cpu_weights) != "bf16"):  # fmt: skip
        return "compiled one-row layer: not used here (it serves the fp16 one-row copy of the CPU's bf16 weights)"
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler and what its probe raises
        return "compiled one-row layer: not built, no C++ compiler here (set CXX); one-row steps run eagerly"
    started = time.monotonic()
    try:
        path = prepare(settings.compiled_dir, AutoConfig.from_pretrained(base))
    except ModelError as err:
        return f"compiled one-row layer: not built, one-row steps run eagerly ({err})"
    if path is None:
        return "compiled one-row layer: not used for this model (its activation is not SiLU)"
    return f"compiled one-row layer ready ({time.monotonic() - started:.1f} s): {path}"
