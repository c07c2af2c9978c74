"""Running the encoder and decoders on batches of aligned faces (no training here)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import numpy as np
import torch
from facemux.models.imageio import resize_square
from facemux.models.networks import Decoder, Encoder
from facemux.models.pixels import images_to_unit, to_uint8
from torch import Tensor

T = TypeVar("T")

# The intra-op count torch gives a new thread in this process before own_intra_op_threads
# first changes it (OMP_NUM_THREADS or torch.set_num_threads, else one per core).
_process_default: int | None = None


def default_threads() -> int:
    """The intra-op count a thread that starts computing now gets."""
    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    return seen[0]


def _set_default_threads(n: int) -> None:
    # From a thread of its own: torch.set_num_threads also sets the calling thread's count.
    setter = threading.Thread(target=torch.set_num_threads, args=(n,), name="facemux-threads")
    setter.start()
    setter.join()


def own_intra_op_threads(threads: int = 0) -> int:
    """Give the calling thread `threads` intra-op threads (0: torch's default for the
    process), and every thread that has not yet run a torch op one; returns the count given.

    Each thread that runs a parallel op keeps an OpenMP team of its own for its life. Once
    the teams hold more threads than there are cores, libgomp stops spinning between
    parallel regions, and every op then pays to wake its team: on 2 cores a small
    elementwise op took 3x as long (bench/RESULTS.md). A server whose batches all run on one
    thread should keep one team, that thread's; its other threads (the model's loader,
    to_thread workers, the frame pipeline) compute on their own."""
    global _process_default
    if _process_default is None:
        _process_default = torch.get_num_threads()
    n = threads or _process_default
    torch.get_num_threads()  # this thread's count fixed now, so the reset below cannot reach it
    torch.set_num_threads(n)  # this thread's team, and (a side effect) the default for new ones
    _set_default_threads(1)
    return n


def on_threads(threads: int, fn: Callable[[], T]) -> T:
    """fn() run on a thread of its own with `threads` intra-op threads, as the batch thread
    runs (own_intra_op_threads): the extra team ends with that thread, and threads that
    start computing later get the count they would have got before."""
    before = default_threads()
    out: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out.append(fn())
        except BaseException as exc:  # raised again on the calling thread
            failed.append(exc)

    worker = threading.Thread(target=run, name="facemux-timed")
    worker.start()
    worker.join()
    _set_default_threads(before)
    if failed:
        raise failed[0]
    return out[0]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but CUDA is not available")
    return dev


# The two layouts a CPU model may run in, by the name settings and metrics use.
LAYOUTS: dict[str, torch.memory_format] = {
    "nchw": torch.contiguous_format,
    "channels_last": torch.channels_last,
}


def set_layout(module: torch.nn.Module, layout: str) -> None:
    module.to(memory_format=LAYOUTS[layout])  # type: ignore[call-overload]


def faster_layout(
    encoder: torch.nn.Module,
    decoder: torch.nn.Module,
    resolution: int,
    batch: int = 8,
    rounds: int = 3,
    margin: float = 0.95,
    budget_s: float = 1.0,
) -> tuple[str, float]:
    """Which layout, "channels_last" or "nchw", runs this encoder and decoder faster on this
    CPU at `batch`, and channels_last's time over nchw's (median of up to `rounds`
    alternating runs after a warm-up run of each; fewer where one run of a layout takes
    more than `budget_s` / `rounds`, at least one). nchw stays unless channels_last takes
    at most `margin` of its time. Leaves both modules in the layout chosen.

    Neither wins everywhere: on one 2-core CPU, channels_last took 0.73x the time of nchw for
    `tiny` and 0.92x for `df128`, but 1.12x for `original64` (bench/RESULTS.md)."""
    x = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))

    def run(layout: str) -> float:
        set_layout(encoder, layout)
        set_layout(decoder, layout)
        xl = x.contiguous(memory_format=LAYOUTS[layout])
        t0 = time.perf_counter()
        decoder(encoder(xl))
        return time.perf_counter() - t0

    with torch.inference_mode():
        # The first run of each picks and caches oneDNN's kernels: not counted.
        slowest = max(run(layout) for layout in LAYOUTS)
        n = max(1, min(rounds, int(budget_s / max(slowest, 1e-9))))
        seconds: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for _ in range(n):
            for layout in LAYOUTS:
                seconds[layout].append(run(layout))
    ratio = statistics.median(seconds["channels_last"]) / statistics.median(seconds["nchw"])
    layout = "channels_last" if ratio <= margin else "nchw"
    set_layout(encoder, layout)
    set_layout(decoder, layout)
    return layout, ratio


def stack_faces(faces: Sequence[np.ndarray], resolution: int) -> tuple[np.ndarray, list[bool]]:
    """RGB uint8 crops of any size -> (N,R,R,3) uint8 at the model's size, and which were
    resized."""
    resized = []
    batch = np.empty((len(faces), resolution, resolution, 3), dtype=np.uint8)
    for i, face in enumerate(faces):
        batch[i], was = resize_square(face, resolution)
        resized.append(was)
    return batch, resized


def faces_to_tensor(
    faces: Sequence[np.ndarray], resolution: int, device: torch.device
) -> tuple[Tensor, list[bool]]:
    """RGB uint8 crops of any size -> (N,3,R,R) float in [0,1], and which were resized."""
    batch, resized = stack_faces(faces, resolution)
    x = images_to_unit(torch.from_numpy(batch).to(device))
    return x, resized


def tensor_to_images(x: Tensor) -> np.ndarray:
    """(N,C,H,W) in [0,1] -> (N,H,W,C) uint8, C squeezed away when it is 1."""
    out = to_uint8(x.detach()).permute(0, 2, 3, 1)
    arr = out.cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


@torch.inference_mode()
def encode(encoder: Encoder, x: Tensor) -> Tensor:
    return encoder(x)


@torch.inference_mode()
def decode(decoder: Decoder, z: Tensor) -> tuple[Tensor, Tensor | None]:
    return decoder(z)


def power_of_two_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `max_batch`, and `max_batch`: a batch padded to the next one runs
    at most twice the rows it needs, and a compiled model sees log2(max_batch) + 1 shapes."""
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch}
    return tuple(sorted(sizes | {max_batch}))


Out = TypeVar("Out", Tensor, tuple[Tensor, Tensor | None])


def in_buckets(
    fn: Callable[[Tensor], Out],
    x: Tensor,
    buckets: Sequence[int],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Out, int]:
    """(fn(x), blank rows run): `fn` called only at the batch sizes in `buckets`
    (ascending), so that a compiled model is traced and its CUDA graphs captured once per
    bucket, not once per size (torch.compile with static shapes stops compiling after
    recompile_limit sizes, and runs the rest uncompiled). `x` gets rows of zeros up to the
    smallest bucket that holds it, or runs in chunks of the largest; only its own rows come
    back. `fn` must treat rows independently (the eval-mode encoder and decoders do). No
    buckets: fn(x) as it is.

    Every batch `fn` gets is a fresh inference tensor, in `memory_format` when it is 4-D:
    the compiled graph's guards also tell inference tensors from others, and strides
    apart, and latents arrive both ways (from the encoder, or from a Decode request), which
    would be two graphs per bucket. What comes back are tensors of their own: a CUDA
    graph's next replay writes over its outputs."""
    n = len(x)
    if not buckets or n == 0:
        return fn(x), 0
    top = buckets[-1]
    if n > top:
        outs = [in_buckets(fn, x[i : i + top], buckets, memory_format) for i in range(0, n, top)]
        return cast(Out, _cat([o for o, _ in outs])), sum(p for _, p in outs)
    size = next(b for b in buckets if b >= n)
    fmt = memory_format if x.dim() == 4 else torch.contiguous_format
    with torch.inference_mode():
        batch = torch.empty((size, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        batch[:n] = x
        batch[n:] = 0
        return _own_rows(fn(batch), n), size - n


def _own_rows(out: Out, n: int) -> Out:
    if isinstance(out, Tensor):
        return out[:n].clone()
    rgb, mask = out
    return rgb[:n].clone(), None if mask is None else mask[:n].clone()


def _cat(
    outs: Sequence[Tensor | tuple[Tensor, Tensor | None]],
) -> Tensor | tuple[Tensor, Tensor | None]:
    tensors = [o for o in outs if isinstance(o, Tensor)]
    if tensors:
        return torch.cat(tensors)
    pairs = [o for o in outs if not isinstance(o, Tensor)]
    masks = [m for _, m in pairs if m is not None]
    return torch.cat([rgb for rgb, _ in pairs]), torch.cat(masks) if masks else None


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
