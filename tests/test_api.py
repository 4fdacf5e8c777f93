"""The public API: every name in sct_convert.__all__ exists, says what it does (Args/Returns,
rendered into the reference by mkdocstrings), and loads on first use so the CLI starts without torch."""
import inspect
import subprocess
import sys
from pathlib import Path

import sct_convert as sct

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip()


def test_every_public_name_has_a_docstring_with_args_and_returns():
    missing = [n for n in sct.__all__ if not inspect.getdoc(getattr(sct, n))]
    assert not missing, f"public names without a docstring: {missing}"
    incomplete = []
    for name in sct.__all__:
        obj = getattr(sct, name)
        doc = inspect.getdoc(obj) or ""
        if inspect.isfunction(obj) or (inspect.isclass(obj) and not issubclass(obj, Exception)):
            takes_args = len(inspect.signature(obj).parameters) > 0
            if takes_args and "Args:" not in doc and "Attributes:" not in doc:
                incomplete.append(f"{name} (Args)")
            if inspect.isfunction(obj) and "Returns:" not in doc:
                incomplete.append(f"{name} (Returns)")
    assert not incomplete, f"public docstrings without their sections: {incomplete}"


def test_every_cli_option_has_help_and_the_group_names_every_command():
    import click

    from sct_convert.cli import cli

    missing = [f"{name} {p.opts[0]}" for name, cmd in cli.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert not missing, f"options without help text: {missing}"
    for name in cli.commands:  # the group's --help shows an example of each command
        assert f"sct-convert {name}" in cli.help or name == "convert", name


def test_import_needs_no_optional_framework():
    code = ("import sys, sct_convert; sct_convert.convert; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'accelerate', 'lightning') if m in sys.modules))")
    assert _run(code) == "[]"


def test_import_and_cli_help_load_no_torch():
    code = ("import sys; from click.testing import CliRunner; from sct_convert.cli import cli; "
            "r = CliRunner().invoke(cli, ['--help']); v = CliRunner().invoke(cli, ['--version']); "
            "print(r.exit_code, v.exit_code, 'torch' in sys.modules)")
    assert _run(code) == "0 0 False"


def test_functions_keep_their_names_when_their_submodules_load_first():
    # loading the submodules that define them first leaves the public names the functions
    code = ("import sct_convert.conversion.rewrite, sct_convert.training.calibration, sct_convert as sct, inspect; "
            "print(inspect.isfunction(sct.convert), inspect.isfunction(sct.calibrate), "
            "sorted(set(sct.__all__) - set(dir(sct))))")
    assert _run(code) == "True True []"
