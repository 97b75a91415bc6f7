"""The few pieces every program shares: one-line errors and warnings, atomic writes, image files read as RGB,
and data folders written once. Nothing here knows about models."""
import os
import sys
import warnings
from contextlib import contextmanager

import numpy as np
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
