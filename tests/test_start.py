"""How `python3 dockerproxy.py` starts: again, in the same process, as an import of
itself (8 MiB less memory), and only when that is safe; run as real processes."""

import os
import shutil
import subprocess
import sys
import threading

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "dockerproxy.py")


def clean_env(**extra):
    """This machine's environment without what would hide the problems (safe path, no bytecode)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONSAFEPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONPATH")}
    env.update(extra)
    return env


def run(args, **kwargs):
    kwargs.setdefault("env", clean_env())
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)


# 1. Re-exec: the working directory is now first on sys.path ###############

def test_a_module_in_the_working_directory_does_not_run_as_a_stdlib_import(tmp_path):
    """`cd /shared/dir && python3 /opt/dockerproxy/dockerproxy.py`: the re-exec uses -c,
    which puts '' (the cwd) first on sys.path; b6fd58c had the script's own directory there."""
    (tmp_path / "argparse.py").write_text("import sys\nsys.stderr.write('SHADOWED\\n')\nsys.exit(99)\n")
    result = run([sys.executable, SCRIPT, "--version"], cwd=tmp_path)
    assert "SHADOWED" not in result.stderr
    assert result.returncode == 0 and "dockerproxy" in result.stdout


# 2. Re-exec: sys.executable is argv[0] looked up in PATH #################

def test_a_process_name_set_with_argv0_does_not_exec_another_program(tmp_path):
    """systemd's ExecStart=@/usr/bin/python3 NAME ..., or `exec -a NAME python3 ...`:
    CPython derives sys.executable from argv[0] via PATH, so the re-exec runs NAME."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    impostor = bin_dir / "dockerproxy-svc"
    impostor.write_text("#!/bin/sh\necho IMPOSTOR RAN\n")
    impostor.chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = run(["dockerproxy-svc", SCRIPT, "--version"], executable=sys.executable, env=env)
    assert "IMPOSTOR" not in result.stdout
    assert result.returncode == 0 and "dockerproxy" in result.stdout


# 3. Re-exec: sources that cannot be read twice ##########################

def test_the_script_from_stdin_runs(tmp_path):
    """`curl -fsSL .../dockerproxy.py | python3 - --port 8080`: __file__ is '<stdin>'."""
    with open(SCRIPT, "rb") as source:
        result = run([sys.executable, "-", "--version"], stdin=source, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-400:]


def test_the_script_from_a_pipe_path_runs(tmp_path):
    """`python3 <(curl -fsSL .../dockerproxy.py)`: /dev/fd/N is a pipe, empty on the second read."""
    read_end, write_end = os.pipe()
    data = open(SCRIPT, "rb").read()

    def feed():
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)
    threading.Thread(target=feed, daemon=True).start()
    try:
        result = run([sys.executable, f"/dev/fd/{read_end}", "--version"], pass_fds=(read_end,), cwd=tmp_path)
    finally:
        os.close(read_end)
    assert result.returncode == 0, result.stderr[-400:]


def test_runpy_run_path_returns_to_its_host(tmp_path):
    """A wrapper that runs the file with runpy.run_path(run_name='__main__') is replaced
    by os.execv: its own code after the call, and its atexit handlers, never run."""
    host = tmp_path / "host.py"
    host.write_text(
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('HOST ATEXIT'))\n"
        f"sys.argv = [{SCRIPT!r}, '--version']\n"
        "try:\n"
        f"    runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('HOST CONTINUES')\n")
    result = run([sys.executable, str(host)], cwd=tmp_path)
    assert "HOST CONTINUES" in result.stdout and "HOST ATEXIT" in result.stdout


# 4. Re-exec: interpreter options dropped, bytecode written beside the script

def test_pycache_prefix_is_kept_and_nothing_is_written_beside_the_script(tmp_path):
    """-X pycache_prefix is not among the options _args_from_interpreter_flags copies
    (nor are -u, -i, -X int_max_str_digits, -X warn_default_encoding), and a script
    never had bytecode written beside it: now __pycache__/ appears in its directory."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(SCRIPT, app / "dockerproxy.py")
    prefix = tmp_path / "prefix"
    result = run([sys.executable, "-X", f"pycache_prefix={prefix}", str(app / "dockerproxy.py"), "--version"],
                 cwd=tmp_path)
    assert result.returncode == 0
    assert not (app / "__pycache__").exists(), os.listdir(app / "__pycache__")


# 5. HashBeside: a failure of the hashing thread is not reported #########

