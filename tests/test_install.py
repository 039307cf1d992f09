"""What installs where: pyproject's dependencies and extras, install.sh, the
tested-version warning, and the report's architecture choices."""

import os
import re
import sys
import warnings

import pytest

from jax_mxfp4_moe.runtime import versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _names(reqs):
    return {re.split(r"[<>=!~\[; ]", r, 1)[0].lower() for r in reqs}


def test_a_plain_install_is_the_cpu_layer_only():
    project = _project()
    assert _names(project["dependencies"]) == {"jax", "jaxlib", "numpy", "ml_dtypes"}
    extras = project["optional-dependencies"]
    assert {"triton"} <= _names(extras["cuda"]) and "torch" not in _names(extras["cuda"])
    assert {"flydsl", "torch"} <= _names(extras["rocm"])
    assert {"flax", "optax"} <= _names(extras["flax"])
    assert {"pytest", "safetensors"} <= _names(extras["test"])


def test_the_extras_pin_the_tested_versions():
    specifiers = pytest.importorskip("packaging.specifiers", reason="packaging parses the pins")
    extras = _project()["optional-dependencies"]
    pins = {"triton": extras["cuda"], "flydsl": extras["rocm"]}
    for package, reqs in pins.items():
        (req,) = [r for r in reqs if r.startswith(package)]
        spec = specifiers.SpecifierSet(req[len(package):])
        for tested in versions.TESTED[package]:
            assert spec.contains(tested + ".0"), (package, tested, req)
        assert not spec.contains("99.0"), req  # an upper bound: a new major is untested
    (jax_req,) = [r for r in _project()["dependencies"] if r.startswith("jax>")]
    assert all(specifiers.SpecifierSet(jax_req[3:]).contains(v + ".2") for v in versions.TESTED["jax"])


def test_an_untested_version_warns_once_naming_what_was_tested():
    versions._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert versions.check("triton", "3.6.0", backend="cuda")
        assert versions.check("triton", "3.9.1+git", backend="cuda")
        assert versions.check("flydsl", None, backend="rocm")  # not installed: nothing to say
        assert not versions.check("triton", "3.10.0", backend="cuda")
        assert not versions.check("triton", "3.10.0", backend="cuda")
    (w,) = caught
    assert issubclass(w.category, versions.UntestedVersionWarning)
    msg = str(w.message)
    assert "cuda backend runs with triton 3.10.0" in msg and "3.6.x" in msg and "3.9.x" in msg
    assert "jax_mxfp4_moe.selfcheck" in msg


def test_install_sh_sets_up_the_test_suite_and_says_so():
    with open(os.path.join(ROOT, "install.sh")) as f:
        text = f.read()
    assert "everything the test suite needs" in text
    assert '-e ".[test,flax,rocm,cuda]"' in text
    # the CPU torch, said explicitly, and nothing upgraded that is installed
    assert "torch==2.13.0+cpu" in text and "download.pytorch.org/whl/cpu" in text
    commands = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "pip install" in commands and not re.search(r"pip install[^\n]*(\s-U\s|--upgrade)", commands)
    # and how to install only what a machine runs
    for line in ('pip install .', 'jax[cuda13]', 'jax[rocm7-local]', '.[flax]'):
        assert line in text, line


def test_readme_names_the_gpu_jax_packages():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for name in ("jax[cuda13]", "jax[rocm7-local]", "download.pytorch.org/whl/cpu", '.[flax]'):
        assert name in text, name


def test_report_offers_only_architectures_it_builds(capsys):
    from jax_mxfp4_moe.rocm import config as rocm_config
    from jax_mxfp4_moe.tools import report

    with pytest.raises(SystemExit):
        report.main(["--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(rocm_config.ARCHS) + "}" in out and "gfx942" not in out
    with pytest.raises(SystemExit) as e:
        report.main(["--arch", "gfx942"])
    assert e.value.code == 2 and "invalid choice: 'gfx942'" in capsys.readouterr().err


def test_the_package_imports_without_the_extras():
    """A CPU-only install: importing the package, the layer and the loader
    pulls in none of triton, flydsl, torch or flax."""
    import subprocess

    code = ("import sys, jax_mxfp4_moe, jax_mxfp4_moe.layer.checkpoints, jax_mxfp4_moe.tools.bench; "
            "print(sorted(m for m in ('triton', 'flydsl', 'torch', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
