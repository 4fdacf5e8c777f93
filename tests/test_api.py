"""The public API: every name in sct_convert.__all__ exists and says what it does."""
import inspect

import sct_convert as sct


def test_every_public_name_has_a_docstring():
    missing = [n for n in sct.__all__ if not inspect.getdoc(getattr(sct, n))]
    assert not missing, f"public names without a docstring: {missing}"


def test_import_needs_no_optional_framework():
    import subprocess
    import sys

    code = ("import sys, sct_convert; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'accelerate', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
