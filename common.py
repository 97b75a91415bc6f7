"""The few pieces the programs share: one-line errors and warnings, atomic writes, image files read as RGB, data
folders written once, and the training state that knows nothing of the models (RNG states, EMA, allocator)."""
import argparse
import ctypes
import json
import os
import random
import signal
import sys
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps

USAGE, FAILURE = 2, 1  # exit statuses: a usage error (arguments, as argparse), a failure (files, data, training)


def prog():
    """The running program's name as the user typed it (train.py, sample.py, ...)."""
    return os.path.basename(sys.argv[0]) or "python"


def fail(msg, status=FAILURE):
    """Print `prog: error: msg` (one line) and exit with `status`. str() of the exception is that line, so an
    in-process caller (tests, toy/evaluate.py) reads what the user reads."""
    line = f"{prog()}: error: {msg}"
    print(line, file=sys.stderr)
    e = SystemExit(line)
    e.code = status
    raise e


def usage_error(msg):
    fail(msg, USAGE)


class DefaultsOnce(argparse.RawDescriptionHelpFormatter):
    """--help: the description as written, and each option's default said once: appended where the option has
    one (not None, False or empty) and its help does not already give it."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        quiet = d is None or d is False or (isinstance(d, (str, list)) and d in ("", [], argparse.SUPPRESS))
        if not action.option_strings or quiet or "default" in h:
            return h
        return h + " (default: %(default)s)"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{prog()}: warning: {message}", file=file or sys.stderr)


def one_line_warnings():
    """Warnings as `prog: warning: message`, without the file, line number and echoed source line."""
    warnings.showwarning = _show_warning


def _fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temp path beside `path` (same extension, so writers that infer the format from it work). If the
    block succeeds the file is flushed to disk and renamed over `path`, and the rename is flushed too: a crash
    or power loss leaves either the old file or the whole new one. If it fails the temp file is removed."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def written_once(path, write):
    """`path`, made by write(path) on first use; a `done` file marks it complete, so a killed write is redone."""
    if not os.path.exists(os.path.join(path, "done")):
        write(path)
        open(os.path.join(path, "done"), "w").close()
    return path


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16-bit (or 32-bit) grey


def open_rgb(path, draft=None):
    """Any image file -> a PIL image of its colours: "RGB" (8-bit), or "F" (one float channel, grey on the 0-255
    scale) for 16/32-bit grey, scaled by its range (65535 if any value needs more than 8 bits, else 255), so no
    precision is lost. EXIF rotation applied, transparency onto white. `draft` (w, h): a JPEG is decoded at the
    smallest 1/2, 1/4, 1/8 scale that still covers it, several times faster for large photos."""
    with Image.open(path) as im:
        if draft:
            im.draft("RGB", draft)
        im = ImageOps.exif_transpose(im)
        if im.mode in HIGH_BIT_MODES:
            a = np.asarray(im, dtype=np.float64)
            return Image.fromarray((a * (255.0 / (65535.0 if a.max() > 255 else 255.0))).clip(0, 255).astype(np.float32))
        if im.mode in ("RGBA", "LA", "P", "PA"):  # transparent pixels' colour is arbitrary: use white
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return im.convert("RGB")


def rgb_array(im):
    """open_rgb's image -> (H, W, 3) float64 in [0, 1]."""
    a = np.asarray(im, dtype=np.float64) / 255.0
    return np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a


# ----------------------------------------------------------------------------- training state

def rng_state():
    """Every RNG a step could touch (LoRA dropout uses torch's; python/numpy for user code), as plain types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)  # weights_only loads tensors
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(), "numpy": numpy}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class EMA:
    """Exponential moving average of the trainable weights (fp32, beside them). The decay warms up as
    min(decay, (1 + n) / (10 + n)): early on it follows the weights instead of averaging in the start."""

    def __init__(self, params, decay):
        self.params, self.decay, self.n = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @contextmanager
    def applied(self):
        """Swap the averaged weights in (to sample or save them), then back."""
        backup = [p.detach().clone() for p in self.params]
        torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            torch._foreach_copy_([p.data for p in self.params], backup)

    def state_dict(self):
        return {"n": self.n, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state):
        self.n = state["n"]
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)  # saved is on the CPU


def return_freed_memory():
    """Linux CPU training with --grad-checkpointing: have glibc give freed tensors back to the OS at once.
    After the first large free glibc raises its mmap threshold (up to 32 MiB), so activations of 1-32 MiB
    then come from the heap, and the pages of freed ones stay resident between live ones: 640 MiB of the
    3.6 GiB peak RSS of a 64x64 batch-4 full fine-tuning step with checkpointing (bench/bench_train.py). A
    fixed 1 MiB threshold gives each such tensor its own mapping, unmapped when freed; the page faults cost
    ~10% of a step (best of 3)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # M_MMAP_THRESHOLD (malloc.h)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
            pass


def open_log(path, upto):
    """log.jsonl, keeping only the lines of steps <= upto (the checkpoint's): steps redone after --resume
    are not logged twice, and a line cut short by a kill (no newline) is dropped."""
    lines = []
    if upto and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= upto]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(lines)
    return open(path, "a")


@contextmanager
def stop_signals():
    """Ctrl-C / SIGTERM (a cluster's pre-emption) append the signal's name to the yielded list instead of
    killing: a training loop ends its step, writes its checkpoint and exits. A second one stops at once. The
    old handlers come back afterwards."""
    flag, old = [], {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signal.Signals(signum).name)
        print(f"\n{prog()}: {flag[0]}: stopping after this step (again to stop at once)", file=sys.stderr)
    for s in old:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
