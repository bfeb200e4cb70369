"""On-disk caches that make a second start fast: one folder, `~/.cache/sdonnx` by default.

- `openvino/`: OpenVINO's compiled graphs without the weights (its CACHE_DIR, CACHE_MODE
  OPTIMIZE_SIZE; see openvino_model.py).
- `onnxruntime/`: ONNX Runtime's optimized graphs. Building an onnxruntime session optimizes the
  graph (fusions, constant folding, the CPU's blocked NCHWc layout) before it can run; for an
  SD 1.5 UNet that takes 18-34 s of a cold start here, and loading the saved result with
  optimization switched off takes 2.3 s. The saved graph is specific to the onnxruntime
  version, the provider and the CPU (onnxruntime warns that NCHWc graphs are
  hardware-specific), so all three are part of the stamp that must match; one entry per source
  file, rebuilt when the file changes (a UNet's stages, which --low-memory opens at every step,
  have one entry each: together a second copy of the UNet's weights). Writing an entry also
  removes the entries of model files that no longer exist (a deleted or moved folder: each UNet
  entry is as large as the UNet) and the half-written folders of processes that died.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import onnxruntime as ort

from sdonnx.runtime.parts import model_files

# Below this size (model + external data) optimizing takes well under a second: no cache.
MIN_BYTES = 64 * 2**20
# A staging folder or an entry without a readable stamp older than this is abandoned.
STALE_SECONDS = 3600
OPTIMIZED_FILE = "model.onnx"


def default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdonnx"


def resolve_root(cache_dir: str | Path | bool | None) -> Path | None:
    """The cache folder for a load: the one given, False for none; when not given,
    $SDONNX_CACHE_DIR ("off" for none) or ~/.cache/sdonnx."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        env = os.environ.get("SDONNX_CACHE_DIR")
        if env is not None:
            return None if env in ("", "off") else Path(env)
        return default_root()
    return Path(cache_dir)


def _cpu_fingerprint(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown"
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha1("\n".join(wanted).encode()).hexdigest()[:12]


class OptimizedGraphs:
    """Where the optimized graph of an ONNX file lives, and whether it is current."""

    def __init__(self, root: Path, provider: str):
        self.folder = root / "onnxruntime"
        self.provider = provider

    def wanted(self, path: Path) -> bool:
        return sum(p.stat().st_size for p in model_files(path)) >= MIN_BYTES

    def _entry(self, path: Path) -> Path:
        key = hashlib.sha1(f"{path.resolve()}|{self.provider}".encode()).hexdigest()[:16]
        return self.folder / key

    def stamp(self, path: Path) -> dict:
        return {
            "source": str(path.resolve()),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in model_files(path)},
            "onnxruntime": ort.__version__,
            "provider": self.provider,
            "cpu": _cpu_fingerprint(),
        }

    def lookup(self, path: Path) -> Path | None:
        """The saved optimized graph for `path`, if one matches it, this onnxruntime and CPU."""
        entry = self._entry(path)
        try:
            if json.loads((entry / "stamp.json").read_text()) == self.stamp(path):
                return entry / OPTIMIZED_FILE
        except (OSError, ValueError):
            pass
        return None

    def staging(self, path: Path) -> Path:
        """A fresh private folder to have onnxruntime write the optimized graph into."""
        staged = self._entry(path).with_name(f"{self._entry(path).name}.partial-{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        return staged

    def commit(self, path: Path, staged: Path) -> None:
        """Stamp the staged folder and rename it into place (another process may win the race);
        a cache that cannot be written is dropped, never an error."""
        entry = self._entry(path)
        try:
            (staged / "stamp.json").write_text(json.dumps(self.stamp(path), indent=1))
            shutil.rmtree(entry, ignore_errors=True)
            staged.rename(entry)
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
        self.prune()

    def prune(self) -> list[Path]:
        """Remove the entries whose source file is gone, and (after STALE_SECONDS, so that a
        writer in another PID namespace or a rename in flight is never cut short) entries with an
        unreadable stamp and staging folders of processes not running here; returns what was
        removed. Entries of existing files stay, current or not (a stale one is rewritten in
        place at its next load)."""
        removed = []
        for entry in sorted(self.folder.glob("*")) if self.folder.is_dir() else []:
            try:
                old = time.time() - entry.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
            if ".partial-" in entry.name:
                pid = entry.name.rsplit("-", 1)[1]
                if not old or (pid.isdigit() and Path(f"/proc/{pid}").exists()):
                    continue
            else:
                try:
                    source = Path(json.loads((entry / "stamp.json").read_text())["source"])
                except (OSError, ValueError, KeyError, TypeError):
                    if not old:
                        continue
                else:
                    try:
                        source.stat()
                        continue
                    except (FileNotFoundError, NotADirectoryError):
                        pass  # the model file is gone
                    except OSError:
                        continue  # unreadable here is not gone
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
        return removed
