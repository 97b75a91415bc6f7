"""The few pieces the programs share: one-line errors and warnings, atomic writes, image files read as RGB, data
folders written once, the training state that knows nothing of the models (RNG states, EMA, allocator), and
what a run shows while it runs (RunLog: log.jsonl, the progress bar, loss.png, TensorBoard)."""
import argparse
import ctypes
import dataclasses
import errno
import fcntl
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import tomllib
import warnings
import zlib
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

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


def dataclass_parser(cls, description, epilog):
    """An option per field of dataclass `cls` (its metadata: help, choices); booleans are flags, --x/--no-x
    where the default is None (decided later)."""
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=DefaultsOnce)
    for f in dataclasses.fields(cls):
        kw = {"action": "store_true" if f.default is False else argparse.BooleanOptionalAction} if f.type is bool \
            else {"type": f.type}
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kw, **f.metadata)
    return p


def given_options(parser, argv=None):
    """The options the command line itself sets (their dests): argv parsed again with every default suppressed."""
    saved = [(a, a.default) for a in parser._actions]
    for a, _ in saved:
        a.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, d in saved:
            a.default = d


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


class DiskFull(OSError):
    """A write that ran out of space: str() is one line, `no space left on device (N MB needed, M free)`."""

    def __str__(self):
        return self.strerror


def free_bytes(path):
    return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free


FULL_DISK_WORDS = ("No space left", "os error 28", "unexpected pos", "iostream error", "file write failed",
                   "requested and")  # safetensors, torch.save (RuntimeError), np.save (OSError without errno)


def _disk_full(e, path, need, was_free=None):
    """The error to raise for a failed write: DiskFull if it was (or looks like) ENOSPC, else e itself. Only some
    writers say ENOSPC; `was_free` (bytes free when it failed) under 1 MB counts as full too."""
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(w in str(e) for w in FULL_DISK_WORDS) \
        or (was_free is not None and was_free < 2**20)
    if not full:
        return e
    free = free_bytes(path)
    need_s = f"{need / 1e6:.1f} MB needed, " if need else ""
    return DiskFull(errno.ENOSPC, f"no space left on device writing {path} ({need_s}{free / 1e6:.1f} MB free); "
                    "free some space and rerun (the previous file is kept)")


def temp_name(path, pid=None):
    root, ext = os.path.splitext(path)
    return f"{root}.tmp{pid or os.getpid()}{ext}"


@contextmanager
def atomic_path(path, need=0):
    """Yield a temp path beside `path` (same extension, so writers that infer the format from it work). If the
    block succeeds the file is flushed to disk and renamed over `path`, and the rename is flushed too: a crash
    or power loss leaves either the old file or the whole new one. If it fails the temp file is removed, and a
    full disk is raised as DiskFull (`need`: the bytes the write needs, for its message)."""
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; outputs get the user's usual permissions
        os.replace(tmp, path)
        _fsync_dir(path)
    except Exception as e:  # safetensors' SafetensorError is no OSError
        was_free = free_bytes(path)
        if os.path.exists(tmp):  # first: the space it holds is what the message counts
            os.remove(tmp)
        err = _disk_full(e, path, need, was_free)
        if err is e:
            raise
        raise err from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask():
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


TEMP_RE = re.compile(r"\.tmp(\d+)(\.[^.]*)?$")  # temp_name's files (and older `NAME.tmpPID`)


def remove_stale_temps(folder, depth=2):
    """Delete the temp files of writers that are gone (killed mid-write): their pid is not alive here. Returns
    their paths. Only this host's pids can be checked: call it while holding the folder's lock."""
    removed = []
    for d, dirs, files in os.walk(folder):
        if d[len(folder):].count(os.sep) >= depth:
            dirs[:] = []
        for f in files:
            m = TEMP_RE.search(f)
            if m and int(m[1]) != os.getpid() and not pid_alive(int(m[1])):
                os.remove(os.path.join(d, f))
                removed.append(os.path.join(d, f))
    return removed


_HELD_LOCKS = set()  # fds of the FolderLocks this process holds


def _drop_locks_in_child():
    """A forked child (a DataLoader worker) closes its copies of the lock fds (closing, unlike LOCK_UN, leaves the
    parent's flock): else a kill -9 of the parent leaves the folder locked until the orphans notice (~5 s)."""
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


class FolderLock:
    """One writer per output folder: an exclusive flock on FOLDER/.lock, which holds `pid@host`. The kernel
    drops the flock when its process dies, so a killed run never blocks the next one; the lock file then still
    names it, and the next owner warns that it took a stale lock over. A held lock is an error naming its owner.
    `refuse`: a checkpoint that must not exist once the lock is held (a fresh run's ckpt.pt, which a run that
    held the lock a moment ago may have written). Once held, killed writers' temp files in the folder go."""

    def __init__(self, folder, refuse=None):
        self.path, self.fd, self.refuse = os.path.join(folder, ".lock"), None, refuse
        self.me = f"{os.getpid()}@{socket.gethostname()}"
        if os.path.isdir(folder):  # else: acquire() once it is made
            self.acquire()

    def acquire(self):
        if self.fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            pid, _, host = owner.partition("@")
            gone = host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))
            fail(f"{os.path.dirname(self.path)} is in use by {owner} (one run per output folder): wait for it, choose "
                 "another --out" + (f", or, as pid {pid} is gone, delete {self.path}" if gone else
                                    f", or, if that process is gone, delete {self.path}"))
        old = os.read(fd, 200).decode(errors="replace").strip()
        if old and old != self.me:
            warnings.warn(f"{self.path}: took over the stale lock of {old} (that process is gone)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (self.me + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        _HELD_LOCKS.add(fd)
        if self.refuse and os.path.exists(self.refuse):
            self.release()
            fail(f"{self.refuse} exists: pass --resume to continue that run, or choose another --out")
        remove_stale_temps(os.path.dirname(self.path))
        return self

    def release(self):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # kept (not unlinked): a waiter may hold it open; empty = no owner
            os.close(self.fd)
            _HELD_LOCKS.discard(self.fd)
            self.fd = None


def exclusive_names(folder, names, start=0):
    """Reserve output files that exist nowhere yet: names(i) for i = start, start + 1, ... -> the first list of
    paths under `folder` all created here (O_EXCL, empty; the caller writes them, e.g. with atomic_path), so two
    programs writing to one folder never overwrite each other or an earlier run's files."""
    i = start
    while True:
        made = []
        try:
            for n in names(i):
                p = os.path.join(folder, n)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                made.append(p)
            return made
        except FileExistsError:
            for p in made:
                os.remove(p)
            i += 1


def written_once(path, write):
    """`path`, made by write(path) on first use; a `done` file marks it complete, so a killed write is redone."""
    if not os.path.exists(os.path.join(path, "done")):
        write(path)
        open(os.path.join(path, "done"), "w").close()
    return path


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16-bit (or 32-bit) grey


def open_rgb(path, draft=None):
    """Any image file -> a PIL image of its colours: "RGB" (8-bit), or "F" (one float channel, grey on the 0-255
    scale) for 16/32-bit grey, so no precision is lost: I;16 files by 65535, 32-bit ones by their range (65535 if
    any value needs more than 8 bits, else 255). 48-bit RGB PNGs: PIL reads their high bytes (8-bit "RGB", right
    to 1/255); CMYK by PIL's conversion. EXIF rotation applied, transparency onto white. `draft` (w, h): a JPEG
    is decoded at the smallest 1/2, 1/4, 1/8 scale that still covers it, several times faster for large photos."""
    with Image.open(path) as im:
        if draft:
            im.draft("RGB", draft)
        im = ImageOps.exif_transpose(im)
        if im.mode in HIGH_BIT_MODES:
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            return Image.fromarray((a * (255.0 / top)).clip(0, 255).astype(np.float32))
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


def seed_all(seed):
    """torch, python's random and numpy: every RNG user code may draw from."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class CheckpointError(Exception):
    """A checkpoint that cannot be used: str() is one line naming the file, the problem and what to do."""


def _leaves(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, x


def _crc(v):
    """CRC-32 of a leaf: a tensor's dtype, shape and bytes; anything else by its repr."""
    if not isinstance(v, torch.Tensor):
        return zlib.crc32(repr(v).encode())
    t = v.detach().cpu().contiguous().reshape(-1)
    crc = zlib.crc32(f"{t.dtype}{tuple(v.shape)}".encode())
    return zlib.crc32(t.view(torch.uint8).numpy(), crc) if t.numel() else crc


def checksums(state):
    return {k: _crc(v) for k, v in _leaves(state)}


def _kept(path):
    """ROOT-STEP.EXT beside `path`, oldest first."""
    root, ext = os.path.splitext(path)
    step = re.compile(re.escape(os.path.basename(root)) + r"-(\d{6,})" + re.escape(ext))
    found = [(int(m[1]), p) for p in glob.glob(glob.escape(root) + "-*" + ext)
             if (m := step.fullmatch(os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def save_checkpoint_file(state, path, keep=2):
    """state (with "step") -> ROOT-STEP.pt beside `path` (atomic, fsynced, a CRC-32 of every tensor and value
    stored in it under "checksums"), then `path` (ckpt.pt) made a hard link to it; only the newest `keep`
    ROOT-STEP.pt stay. A full disk raises DiskFull before writing, or after, with the temp file removed and
    the previous checkpoints intact. Returns `path`."""
    state = {**state, "checksums": checksums(state)}
    need = sum(v.numel() * v.element_size() for _, v in _leaves(state) if isinstance(v, torch.Tensor))
    if free_bytes(path) < need:
        raise _disk_full(OSError(errno.ENOSPC, "no space"), path, need)
    root, ext = os.path.splitext(path)
    step_path = f"{root}-{state['step']:06d}{ext}"
    with atomic_path(step_path, need) as tmp:
        torch.save(state, tmp)
    with atomic_path(path) as tmp:
        try:
            os.link(step_path, tmp)
        except OSError:  # no hard links here (some network / FAT file systems): a copy
            shutil.copyfile(step_path, tmp)
    for old in _kept(path)[:-keep]:
        os.remove(old)
    return path


def _others(path):
    same = os.stat(path) if os.path.exists(path) else None
    others = [p for p in _kept(path) if not (same and os.path.samestat(os.stat(p), same))]
    if not others:
        return "; no older checkpoint is kept: start again without --resume, in a new --out"
    return (f"; kept: {', '.join(map(os.path.basename, others))}; to resume from one of them: "
            f"ln -f {others[-1]} {path}")


def load_checkpoint_file(path, required=()):
    """save_checkpoint_file's state, checked: readable (safely: weights_only), a dict with the `required`
    keys, every checksum right. Anything else raises CheckpointError, one line naming the problem and what to do."""
    size = os.path.getsize(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else: each its own type
        why = "an empty file" if size == 0 else f"truncated, or not a checkpoint: {type(e).__name__}"
        raise CheckpointError(f"{path} is unreadable ({why}, {size} bytes){_others(path)}") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (no {', '.join(map(repr, missing))})"
                              + _others(path))
    saved = state.pop("checksums", None)
    if saved is None:
        warnings.warn(f"{path} has no checksums (an older train.py wrote it): not verified")
        return state
    now = checksums(state)
    bad = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
    if bad:
        raise CheckpointError(f"{path} is corrupted: {len(bad)} value(s) fail their checksum ({', '.join(bad[:3])})"
                              f"{_others(path)}")
    return state


class DivergenceGuard:
    """The rule that stops an exploding run: the trainable weights' norm must stay finite and within `factor`
    times its value when training began (kept across --resume). Normal fine-tuning moves it by a few percent;
    an update of the size of the weights (e.g. --lr 1e6) grows it a thousandfold in one step."""

    def __init__(self, params, ref=None, factor=10.0):
        self.params, self.factor = params, factor
        self.ref = ref if ref is not None else self.norm()

    def norm(self):
        with torch.no_grad():
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.float() for p in self.params]))).item()

    def check(self):
        """None, or what is wrong."""
        n = self.norm()
        if not n <= self.factor * max(self.ref, 1e-3):  # also catches NaN
            return (f"the weights' norm is {n:.3g}, over {self.factor:g}x its start {self.ref:.3g} (the rule for an "
                    "exploding run)" if n == n and n != float("inf") else f"the weights' norm is {n}")
        return None


def lr_at(lr, step, warmup, total, decay="none"):
    """The learning rate of optimizer step step + 1 (of `total`): linear warmup over `warmup` steps, then constant
    (decay "none") or a half cosine that would reach 10% of lr at step `total` (decay "cosine", as nanoGPT's: short
    from-scratch runs end on small steps)."""
    if step < warmup:
        return lr * min(1.0, (step + 1) / warmup)
    if decay == "none":
        return lr
    return lr * (0.55 + 0.45 * math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def ema_decay(n, decay, warmup="ours"):
    """The EMA decay at update n (1, 2, ...). ours: min(decay, (1 + n) / (10 + n)). official (CompVis/diff2flow's
    ema.py, lucidrains' ema-pytorch with update_after_step 1000, power 3/4, as configs/config.yaml and
    trainer_module.py set it): a plain copy for the first 1001 updates, then min(decay, 1 - (1 + e)^-3/4),
    e = n - 1001 (0.999 from e = 10^4)."""
    if warmup == "official":
        return min(decay, 1 - (1 + max(n - 1001, 0)) ** -0.75)
    return min(decay, (1 + n) / (10 + n))


class EMA:
    """Exponential moving average of the trainable weights (fp32, beside them). The decay warms up as
    ema_decay says: early on it follows the weights instead of averaging in the start."""

    def __init__(self, params, decay, warmup="ours"):
        self.params, self.decay, self.warmup, self.n = params, decay, warmup, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = ema_decay(self.n, self.decay, self.warmup)
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
    return open(path, "a", buffering=1)  # line-buffered: each step's line is on disk at once


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


# ----------------------------------------------------------------------------- watching a run

def smooth(values, span):
    """Bias-corrected exponential moving average (TensorBoard's smoothing) with weight 2 / (span + 1) on the newest."""
    w, avg, norm, out = 1 - 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg, norm = w * avg + (1 - w) * v, w * norm + (1 - w)
        out.append(avg / norm)
    return out


def nice_ticks(lo, hi, n=5):
    """About n round tick values (1, 2, 5 x 10^k apart) covering [lo, hi]."""
    raw = max(hi - lo, 1e-12) / n
    step = min((m * 10 ** np.floor(np.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** np.floor(np.log10(raw)) >= raw))
    return [k * step for k in range(int(np.ceil(lo / step)), int(np.floor(hi / step)) + 1)]


def plot_loss(steps, losses, path, title="training loss", size=(900, 420)):
    """The loss curve as a PNG (PIL only): each step's loss in light blue, its moving average (span 1.5 sqrt(steps):
    12 of 60, 37 of 600, enough to see the trend through the noise of random t) in dark blue, the y range set by
    the average and the raw values' 2-98% quantiles (a spike of the first steps does not flatten the rest),
    labelled axes with round ticks."""
    W, H = size
    img, font = Image.new("RGB", size, "white"), ImageFont.load_default(size=14)
    draw, (x0, y0, x1, y1) = ImageDraw.Draw(img), (70, 40, W - 20, H - 45)
    span = max(1, round(1.5 * len(losses) ** 0.5))
    avg = smooth(losses, span)
    lo = min(min(avg), float(np.quantile(losses, 0.02)))
    hi = max(max(avg), float(np.quantile(losses, 0.98)))
    lo, hi = lo - 0.05 * (hi - lo + 1e-12), hi + 0.05 * (hi - lo + 1e-12)
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
    X = lambda s: x0 + (s - s0) / (s1 - s0) * (x1 - x0)
    Y = lambda v: y1 - (min(max(v, lo), hi) - lo) / (hi - lo) * (y1 - y0)
    for t in nice_ticks(lo, hi):
        draw.line((x0, Y(t), x1, Y(t)), fill=(230, 230, 230))
        draw.text((x0 - 6, Y(t)), f"{t:.4g}", fill="black", font=font, anchor="rm")
    for t in nice_ticks(s0, s1, 8):
        draw.line((X(t), y1, X(t), y1 + 4), fill="black")
        draw.text((X(t), y1 + 6), f"{t:g}", fill="black", font=font, anchor="ma")
    if len(steps) > 1:
        draw.line([(X(s), Y(v)) for s, v in zip(steps, losses)], fill=(170, 200, 235), width=1)
        draw.line([(X(s), Y(v)) for s, v in zip(steps, avg)], fill=(20, 70, 160), width=3)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    draw.text((x0, 12), f"{title} at step {steps[-1]}: {avg[-1]:.4g} (dark: moving average over ~{span} steps; "
              "light: each step)", fill="black", font=font)
    draw.text(((x0 + x1) // 2, H - 18), "step", fill="black", font=font, anchor="ma")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def tensorboard_writer(folder):
    """torch's TensorBoard SummaryWriter (optional: the tensorboard package); a missing package is one line."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        fail("--tensorboard needs the tensorboard package: pip install tensorboard (or leave --tensorboard out: "
             "loss.png is drawn beside the sample grids)")
    return SummaryWriter(folder)


class RunLog:
    """What a training run shows while it runs: OUT/log.jsonl (one line per step: step, loss, lr, grad_norm,
    time), the progress bar's loss, lr and images/s (tqdm adds the ETA), at each sample grid a fresh
    loss.png beside it, and with tensorboard=True the same scalars, the step time and the grids in OUT/tensorboard.
    master=False (the other DDP ranks): every method does nothing."""

    def __init__(self, out, start, images_per_step, tensorboard=False, master=True):
        self.master, self.images_per_step, self.sec, self.tb = master, images_per_step, None, None
        if master:
            self.tb = tensorboard_writer(os.path.join(out, "tensorboard")) if tensorboard else None
            self.file = open_log(os.path.join(out, "log.jsonl"), start)

    def step(self, bar, step, loss, lr, grad_norm, sec, counts=None):
        """One optimizer step's row; counts: the data's skipped items so far (only once there are some)."""
        if not self.master:
            return
        row = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, time=sec, **(counts or {}))
        self.file.write(json.dumps(row) + "\n")
        self.sec = sec if self.sec is None else 0.9 * self.sec + 0.1 * sec  # images/s: steadier over ~10 steps
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_per_s=f"{self.images_per_step / self.sec:.1f}")
        if self.tb:
            for k, v in dict(loss=loss, lr=lr, grad_norm=grad_norm, step_time=sec,
                             images_per_s=self.images_per_step / sec).items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def grid(self, path, step):
        """After a sample grid was written to path: loss.png beside it (from log.jsonl), the grid to TensorBoard."""
        if not self.master:
            return
        self.file.flush()
        with open(self.file.name) as f:
            rows = [json.loads(line) for line in f if line.endswith("\n")]
        if rows:
            plot_loss([r["step"] for r in rows], [r["loss"] for r in rows],
                      os.path.join(os.path.dirname(path), "loss.png"))
        if self.tb and os.path.exists(path):
            with Image.open(path) as im:
                self.tb.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()

    def close(self):
        if self.master:
            self.file.close()
        if self.tb:
            self.tb.close()


def setting_value(v):
    """A settings-file value: plain, or {value = ..., source = "..."} (where it comes from)."""
    return v["value"] if isinstance(v, dict) and "value" in v else v


def load_settings(path):
    """A TOML file of named settings (train.py's presets, recipes/) -> {name: {field: value}}, each table with
    the values of the table its `inherit` names filled in (a chain). Sources stay in table[name]["sources"]."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)

    def resolved(name, seen=()):
        if name in seen or name not in raw:
            raise ValueError(f"{path}: [{name}] is inherited in a cycle or missing")
        t = raw[name]
        out = resolved(t["inherit"], (*seen, name)) if "inherit" in t else {"sources": {}}
        out = {**out, "sources": dict(out["sources"])}
        for k, v in t.items():
            if k != "inherit":
                out[k] = setting_value(v)
                out["sources"][k] = v.get("source", "") if isinstance(v, dict) else ""
        return out
    return {name: resolved(name) for name in raw if not name.startswith("_")}


def resolve_settings(cfg, presets, recipes, world=1):
    """Fill the options of dataclass `cfg` not given on the command line (cfg.given, from given_options; else
    those still at their default) from --recipe's table, then --preset's (default: TASK with a --ckpt, TASK-demo
    without). lr: the table's lora_lr under --lora. A recipe's global_batch sets --grad-accum for `world`
    processes unless given. --print-config: the result as JSON (with the recipe's sources), exit 0."""
    fields = dataclasses.fields(cfg)
    given = getattr(cfg, "given", None) or {f.name for f in fields if getattr(cfg, f.name) != f.default}
    recipe = recipes[cfg.recipe] if cfg.recipe else {"sources": {}}
    task = cfg.task if "task" in given else recipe.get("task", cfg.task)
    cfg.preset = cfg.preset if "preset" in given else recipe.get("preset") or (task if cfg.ckpt else f"{task}-demo")
    if cfg.preset not in presets:
        usage_error(f"unknown --preset {cfg.preset!r}: use one of {', '.join(presets)}")
    table = {**presets[cfg.preset], **recipe, "preset": cfg.preset}
    vars(cfg).update({k: v for k, v in table.items() if hasattr(cfg, k) and k not in given | {"lr", "preset"}})
    cfg.lr = cfg.lr if "lr" in given else table["lora_lr"] if cfg.lora else table["lr"]
    if "global_batch" in table and "grad_accum" not in given:
        cfg.grad_accum, rest = divmod(table["global_batch"], cfg.batch_size * world)
        if rest or not cfg.grad_accum:
            usage_error(f"--recipe {cfg.recipe}: its global batch {table['global_batch']} is not a multiple of "
                        f"--batch-size {cfg.batch_size} x {world} process(es); pass a --batch-size that divides it "
                        "(or --grad-accum)")
    if cfg.print_config:
        resolved = {f.name: getattr(cfg, f.name) for f in fields}
        print(json.dumps({**resolved, "global_batch": cfg.batch_size * cfg.grad_accum * world, "world_size": world,
                          "sources": {k: s for k, s in recipe["sources"].items() if s}}, indent=1))
        raise SystemExit(0)
