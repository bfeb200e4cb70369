"""The runtime generates an image in a process where importing torch fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "diffusers", "transformers", "optimum", "onnx")

SCRIPT = textwrap.dedent("""
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"{{name}} is blocked in this test")

    sys.meta_path.insert(0, Block())
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("torch imported despite the block")

    from sdonnx import Pipeline
    pipe = Pipeline.load({model!r}, provider="cpu")
    image = pipe.generate("a red circle", steps=3, width=64, height=64, seed=1)[0]
    assert image.size == (64, 64), image.size
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
    assert not loaded, loaded
    print("ok", image.info["parameters"].splitlines()[-1])
""")


def test_generates_with_torch_blocked(tiny_onnx):
    code = SCRIPT.format(blocked=set(BLOCKED), model=str(tiny_onnx))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok Steps: 3, Sampler: Euler")


def test_cli_generate_with_torch_blocked(tiny_onnx, tmp_path):
    """The console entry point too: `sdonnx generate` must not touch the export stage."""
    code = SCRIPT.split("from sdonnx import Pipeline")[0].format(blocked=set(BLOCKED), model="") + textwrap.dedent(f"""
        sys.argv = ["sdonnx", "generate", "a cat", "--model", {str(tiny_onnx)!r}, "--size", "64x64",
                    "--steps", "2", "--seed", "5", "--out", {str(tmp_path)!r}]
        from sdonnx.cli.app import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "00000-5.png").is_file()


def test_export_without_the_export_extra_says_what_to_install(tiny_source, tmp_path):
    code = SCRIPT.split("from sdonnx import Pipeline")[0].format(blocked=set(BLOCKED), model="") + textwrap.dedent(f"""
        sys.argv = ["sdonnx", "export", {str(tiny_source)!r}, {str(tmp_path / "out")!r}]
        from sdonnx.cli.app import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "[export]'" in proc.stderr and "pip install" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_quantize_without_the_export_extra_says_what_to_install(tmp_path):
    code = SCRIPT.split("from sdonnx import Pipeline")[0].format(blocked=set(BLOCKED), model="") + textwrap.dedent(f"""
        sys.argv = ["sdonnx", "quantize", {str(tmp_path / "missing")!r}, {str(tmp_path / "out")!r}, "--mode", "fp16"]
        from sdonnx.cli.app import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "the export stage needs" in proc.stderr and "[export]'" in proc.stderr and "Traceback" not in proc.stderr
