"""Writing images: the format the file name asks for, the generation parameters inside, and
never a half-written or overwritten file.

`--out` is a folder (images numbered `00000-SEED.png` inside it) or a file name whose suffix
names the format: PNG keeps the parameters in a `parameters` text chunk, JPEG and WebP in the
EXIF UserComment, as AUTOMATIC1111's web UI writes them (its "PNG info" tab reads both).
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdonnx.runtime.errors import InputError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_QUALITY = 95  # AUTOMATIC1111's default jpeg_quality
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286


def out_path(out: str) -> Path:
    """`--out` as a path; an empty one is refused rather than read as the current folder."""
    if not out.strip():
        raise InputError("--out is empty; give a folder or a file name such as image.png")
    return Path(out)


def image_suffix(out: Path) -> str | None:
    """The format suffix of `--out` when it names a file (None: a folder), or an InputError
    for an image format sdonnx does not write."""
    suffix = out.suffix.lower()
    if suffix in FORMATS:
        return suffix
    if suffix and suffix in Image.registered_extensions() and not out.is_dir():
        raise InputError(f"--out {out}: sdonnx writes {', '.join(FORMATS)} files (or give a folder), not {suffix}")
    return None


def output_paths(out: Path, n: int) -> list[Path] | None:
    """Explicit file names for `--out x.png` (None: number files inside the folder `out`)."""
    if image_suffix(out) is None:
        return None
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def grid_path(out: Path) -> Path | None:
    """`x-grid.png` beside `--out x.png` (None: a numbered file inside the folder `out`)."""
    return out.with_name(f"{out.stem}-grid{out.suffix}") if image_suffix(out) else None


def prepare_folder(out: Path) -> Path:
    """The folder images go to, created if needed, or an InputError saying why it cannot be."""
    folder = out.parent if image_suffix(out) else out
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write in output folder {folder} (permission denied)")
    return folder


def refuse_existing(paths: list[Path] | None) -> None:
    """Fail before any work when an explicitly named output file exists."""
    for path in paths or []:
        if path.exists():
            raise InputError(f"{path} already exists; it was not overwritten (choose another --out)")


def exif_user_comment(text: str) -> bytes:
    """EXIF with `text` as the UserComment, in the Unicode form (UCS-2, big-endian) that
    piexif.helper.UserComment writes for AUTOMATIC1111."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif.tobytes()


def _encode(image: Image.Image, file, suffix: str, text: dict[str, str] | None = None) -> None:
    parameters = image.info.get("parameters", "")
    kind = FORMATS[suffix]
    if kind == "PNG":
        info = PngInfo()
        info.add_text("parameters", parameters)
        for key, value in (text or {}).items():
            info.add_text(key, value)
        image.save(file, format="PNG", pnginfo=info)
    else:
        image.convert("RGB").save(file, format=kind, quality=JPEG_QUALITY, exif=exif_user_comment(parameters))


def _next_number(folder: Path) -> int:
    """One past the largest NNNNN of the images sdonnx numbered in `folder` (0 for none)."""
    numbers = [int(m[1]) for f in folder.iterdir()
               if f.suffix.lower() in FORMATS and (m := re.match(r"(\d{5,})-\d+", f.name))]
    return max(numbers, default=-1) + 1


def encode(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """The PNG file `save_image` would write for `image`, as bytes (its parameters inside),
    with `text`'s keys and values as more text chunks."""
    buffer = io.BytesIO()
    _encode(image, buffer, ".png", text)
    return buffer.getvalue()


def save_image(image: Image.Image, path: Path | None, folder: Path, seed: int, suffix: str = "") -> Path:
    """Write `image` (its info["parameters"] inside) to `path`, or to the next free number in
    `folder` as PNG; returns the path written.

    The bytes go to a temporary file beside the target, created with the umask's permissions
    as any other file, and are hard-linked into place, which fails rather than overwrite: a
    full disk or a crash leaves no partial image and no temporary file behind.
    """
    fmt = path.suffix.lower() if path else ".png"
    return _place(lambda f: _encode(image, f, fmt), fmt, path,
                  lambda: folder / f"{_next_number(folder):05d}-{seed}{suffix}.png", folder)


def save_encoded(data: bytes, path: Path) -> Path:
    """Write the encoded image `data` to `path` as `save_image` writes: all or nothing,
    never over an existing file (InputError)."""
    return _place(lambda f: f.write(data), path.suffix.lower(), path, None, path.parent)


def _place(write, fmt: str, path: Path | None, numbered, folder: Path) -> Path:
    """`write(file)` into a temporary file, hard-linked to `path` or to `numbered()`."""
    target_dir = path.parent if path else folder
    tmp = target_dir / f".sdonnx-{secrets.token_hex(6)}{fmt}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it has its name: a crash never leaves a torn image named
        while True:
            final = path or numbered()
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                if path:
                    raise InputError(f"{final} already exists; it was not overwritten") from None
    except InputError:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise InputError(f"no space left on the device of {target_dir}; nothing was written") from None
        raise InputError(f"cannot write {path or folder}: {e.strerror or e}") from None
    except ValueError as e:  # the encoder's limits: WebP sides over 16383, JPEG EXIF over 64 KB
        raise InputError(f"cannot write {path or folder} as {FORMATS[fmt]}: {e}; write a PNG instead") from None
    finally:
        tmp.unlink(missing_ok=True)


def preview_path(value: str) -> Path:
    """The --preview file: a PNG, JPEG or WebP name in an existing folder (it is rewritten
    during the run, so an existing file of that name is replaced, as asked)."""
    path = Path(value).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"--preview {value}: name an image file ({', '.join(FORMATS)})")
    if not path.parent.is_dir():
        raise InputError(f"--preview {value}: the folder {path.parent} does not exist")
    return path


def write_preview(image: Image.Image, path: Path) -> None:
    """Replace the preview file atomically (a viewer never sees half an image)."""
    tmp = path.parent / f".sdonnx-{secrets.token_hex(6)}{path.suffix.lower()}.tmp"
    try:
        with open(tmp, "wb") as f:
            _encode(image, f, path.suffix.lower())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
