"""The documentation, checked against the code and the tools it names.

* The systemd unit in README.md, and its HTTPS drop-in, pass `systemd-analyze
  verify` (Debian package systemd), and keep the sandbox the README describes.
  A missing systemd-analyze skips that test loudly, or fails it under CI
  (REQUIRE_INTEROP=1), as the interop tests do.
* The settings are written down four times besides dockerproxy.SETTINGS: in
  the module docstring, in --help, in README.md's settings table and in
  .env.example.  All four must name the same settings with the same defaults.
  Each copy has a small parser; the comparison works on what they return, so
  the tests at the end feed it copies that are wrong on purpose.
* Every in-page link of README.md leads to a heading.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

import dockerproxy

REQUIRED = bool(os.environ.get("REQUIRE_INTEROP"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as file:
        return file.read()


# The systemd unit ##########################################################

UNIT = "/etc/systemd/system/dockerproxy.service"
DROP_IN = "/etc/systemd/system/dockerproxy.service.d/https.conf"
INSTALLED_PYTHON = "/usr/bin/python3"
INSTALLED_MODULE = "/opt/dockerproxy/dockerproxy.py"


def readme_ini_blocks(text):
    """README's ```ini blocks (also indented in a list), by the /etc/systemd/... file
    named in the paragraph just before each, as test_interop finds the toml ones."""
    blocks = {}
    for match in re.finditer(r"^( *)```ini\n(.*?)^\1```", text, re.S | re.M):
        paragraph = text[:match.start()].rstrip().rsplit("\n\n", 1)[-1]
        paths = re.findall(r"`(/etc/systemd/system/[^`\s]+)`", paragraph)
        if paths:
            blocks[paths[-1]] = textwrap.dedent(match.group(2))
    return blocks


def readme_unit(path):
    blocks = readme_ini_blocks(read("README.md"))
    assert path in blocks, f"README.md has no ```ini block for {path} (found: {sorted(blocks)})"
    return blocks[path]


def unit_directives(unit):
    """'Key=value' lines -> {key: [values]} (systemd's own format: no inline comments)."""
    directives = {}
    for line in unit.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def need_systemd_analyze():
    if SYSTEMD_ANALYZE:
        return
    reason = "systemd-analyze missing (Debian package systemd)"
    if REQUIRED:
        pytest.fail(f"REQUIRE_INTEROP is set but {reason}", pytrace=False)
    pytest.skip(f"DOCS TEST SKIPPED: {reason}")


def quoted(path):
    return f'"{path}"' if re.search(r"\s", path) else path


def write_local_unit(directory, unit, drop_in=None):
    """The unit as installed, but with ExecStart on this interpreter and this checkout,
    so that verify's check that the program exists means something here."""
    local = unit.replace(INSTALLED_PYTHON, quoted(sys.executable))
    local = local.replace(INSTALLED_MODULE, quoted(os.path.join(ROOT, "dockerproxy.py")))
    path = directory / "dockerproxy.service"
    path.write_text(local, encoding="utf-8")
    if drop_in is not None:
        # verify reads drop-ins from <unit>.d/ beside the unit file.
        (directory / "dockerproxy.service.d").mkdir()
        (directory / "dockerproxy.service.d" / "https.conf").write_text(drop_in, encoding="utf-8")
    return path


def systemd_analyze_verify(path):
    """(exit status, output) of `systemd-analyze verify`.

    It needs no running systemd and no flags here (checked in a container whose
    PID 1 is not systemd, as root and as nobody): it loads the unit, its drop-ins and
    the units it names, and checks that ExecStart's program is executable.  A
    misspelt or unknown directive, or a value it cannot parse, is only a warning
    line with exit status 0, so callers must treat any output as a failure.
    """
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    return result.returncode, result.stdout.strip()


def test_readme_systemd_unit_and_https_drop_in_pass_systemd_analyze_verify(tmp_path):
    need_systemd_analyze()
    unit, drop_in = readme_unit(UNIT), readme_unit(DROP_IN)
    status, output = systemd_analyze_verify(write_local_unit(tmp_path, unit, drop_in))
    assert (status, output) == (0, ""), f"systemd-analyze verify on README's unit and drop-in:\n{output}"


def test_systemd_analyze_verify_reports_a_misspelt_directive(tmp_path):
    """The check above can fail: verify's warnings are seen, not only its exit status."""
    need_systemd_analyze()
    unit = readme_unit(UNIT)
    assert "\nProtectHome=" in unit
    status, output = systemd_analyze_verify(
        write_local_unit(tmp_path, unit.replace("\nProtectHome=", "\nProtectHom=")))
    assert "ProtectHom" in output, (status, output)


def test_readme_systemd_unit_runs_the_module_sandboxed_with_its_cache_in_the_state_directory():
    directives = unit_directives(readme_unit(UNIT))
    expected = {
        "ExecStart": [f"{INSTALLED_PYTHON} {INSTALLED_MODULE}"],
        "DynamicUser": ["yes"],
        "ProtectSystem": ["strict"],
        "NoNewPrivileges": ["yes"],
        "StateDirectory": ["dockerproxy"],
        "Restart": ["on-failure"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
    }
    for key, values in expected.items():
        assert directives.get(key) == values, f"README's unit: {key}={directives.get(key)}, expected {values}"
    for key in ("PrivateTmp", "ProtectHome", "ProtectKernelTunables"):
        assert directives.get(key) == ["yes"], f"README's unit: {key} is not yes"
    environment = " ".join(directives.get("Environment", []))
    # StateDirectory=dockerproxy is /var/lib/dockerproxy, the only place the service may write.
    assert "CACHE_DIR=/var/lib/dockerproxy" in environment.split()


# The four copies of the settings ###########################################

# A setting's name as the copies write it, per-route ones included (UPSTREAM_<ROUTE>_USERNAME).
NAME = r"[A-Z][A-Z0-9_]*(?:<ROUTE>[A-Z0-9_]*)?"

# The per-route settings, which SETTINGS does not hold.  None: no default to
# compare (unset means the registry's own upstream).
ROUTE_SETTINGS = {
    "UPSTREAM_<ROUTE>": None,
    "UPSTREAM_<ROUTE>_USERNAME": "",
    "UPSTREAM_<ROUTE>_PASSWORD": "",
}

# Settings with no flag: --help names them in its epilog, without a default.
FLAGLESS = ("UPSTREAM_<ROUTE>_USERNAME", "UPSTREAM_<ROUTE>_PASSWORD", "ADMIN_TOKEN", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PEER_SECRET")


def canonical_settings():
    settings = {setting.env: setting.default for setting in dockerproxy.SETTINGS}
    settings.update(ROUTE_SETTINGS)
    return settings


def default_text(text):
    """A default as a copy writes it -> the string SETTINGS holds ("empty" is "")."""
    text = text.strip().strip("`").strip()
    return "" if text == "empty" else text


def route_generic(name):
    """UPSTREAM_K8S_GCR -> UPSTREAM_<ROUTE>; UPSTREAM_DOCKER_PASSWORD -> UPSTREAM_<ROUTE>_PASSWORD."""
    return re.sub(r"\AUPSTREAM_(?!<ROUTE>)[A-Z0-9_]+?(_USERNAME|_PASSWORD)?\Z", r"UPSTREAM_<ROUTE>\1", name)


def docstring_settings(doc):
    """The docstring's list after its 'Settings' line: '  NAME=default  what it is' up to a
    blank line; one line may hold several ('TLS_CERT=, TLS_KEY=  ...'), and lines indented
    deeper continue the one before."""
    lines = (doc or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Settings")), None)
    if start is None or start + 1 >= len(lines):
        return {}
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    found = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        if len(line) - len(line.lstrip()) != indent:
            continue
        rest = line.strip()
        match = re.match(rf"({NAME})=([^\s,]*),?\s*", rest)
        while match:
            found[match.group(1)] = match.group(2)
            rest = rest[match.end():]
            match = re.match(rf"({NAME})=([^\s,]*),?\s*", rest)
    return found


def help_settings(text):
    """--help: '(env NAME, default VALUE)' after each flag, wherever argparse wrapped it;
    the flagless ones need only be named."""
    flat = " ".join(text.split())
    found = {name: default_text(value)
             for name, value in re.findall(rf"\(env ({NAME}), default ([^)]*)\)", flat)}
    for name in FLAGLESS:
        if name not in found and name in flat:
            found[name] = None
    return found


def readme_rows(text):
    """README's settings table: {NAME: (flag cell, default cell)}; one row may name several."""
    rows = {}
    lines = iter(text.splitlines())
    for line in lines:
        if re.match(r"\|\s*Environment\s*\|\s*Flag\s*\|\s*Default\s*\|", line):
            next(lines, None)  # |---|---|
            break
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|", 3)]
        if len(cells) < 3:
            continue
        for name in re.findall(rf"`({NAME})`", cells[0]):
            rows[name] = (cells[1], cells[2])
    return rows


def readme_settings(text):
    return {name: default_text(default) for name, (_, default) in readme_rows(text).items()}


def env_example_settings(text):
    """.env.example: '# NAME=default' (or uncommented); the first line of a name is its
    default, later ones are examples.  Route names stand for UPSTREAM_<ROUTE>...; the
    first UPSTREAM_<ROUTE> line is an example too, as that setting has no default."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"#?\s*({NAME})=(.*)\Z", line.strip())
        if match:
            found.setdefault(route_generic(match.group(1)), match.group(2).strip())
    return found


def out_of_step(copy, found, canonical):
    """What `copy` (a {name: default} from one of the parsers) gets wrong; [] if nothing.
    A default of None (a setting without one, or a copy that names it without one) is
    not compared."""
    problems = []
    for name, default in canonical.items():
        if name not in found:
            problems.append(f"{copy} does not list {name}")
        elif None not in (default, found[name]) and found[name] != default:
            problems.append(f"{copy} gives {name} the default {found[name]!r}, the code {default!r}")
    problems += [f"{copy} lists {name}, which is not a setting" for name in found if name not in canonical]
    return problems


COPIES = {
    "the module docstring": lambda: docstring_settings(dockerproxy.__doc__),
    "--help": lambda: help_settings(dockerproxy.build_parser().format_help()),
    "README.md's settings table": lambda: readme_settings(read("README.md")),
    ".env.example": lambda: env_example_settings(read(".env.example")),
}


@pytest.mark.parametrize("copy", COPIES)
def test_settings_copy_lists_every_setting_with_its_default(copy):
    problems = out_of_step(copy, COPIES[copy](), canonical_settings())
    assert not problems, "\n".join(problems)


def test_readme_settings_table_names_each_settings_flag():
    rows = readme_rows(read("README.md"))
    for setting in dockerproxy.SETTINGS:
        flag = rows.get(setting.env, ("", ""))[0]
        if setting.secret:  # no flag: a command line is visible to every user
            assert "only" in flag and "--" not in flag, f"README.md's settings table: {setting.env} has flag {flag!r}"
            continue
        assert f"`{setting.flag}`" in flag, f"README.md's settings table: {setting.env} has flag {flag!r}, not {setting.flag}"


# Each copy, written wrong on purpose: PORT's default changed the way that copy writes it.
PORT = {setting.env: setting.default for setting in dockerproxy.SETTINGS}["PORT"]
WRONG_COPIES = [
    ("the module docstring", lambda: dockerproxy.__doc__, docstring_settings,
     rf"(?m)^([ \t]+PORT=){PORT}\b"),
    ("--help", lambda: dockerproxy.build_parser().format_help(), help_settings,
     rf"(\(env\s+PORT,\s+default\s+){PORT}\b"),
    ("README.md's settings table", lambda: read("README.md"), readme_settings,
     rf"(?m)^(\| `PORT` \|[^|]*\| `){PORT}\b"),
    (".env.example", lambda: read(".env.example"), env_example_settings,
     rf"(?m)^(#\s*PORT=){PORT}\b"),
]


@pytest.mark.parametrize("copy, source, parse, pattern", WRONG_COPIES, ids=[w[0] for w in WRONG_COPIES])
def test_settings_comparison_reports_a_copy_with_a_wrong_default(copy, source, parse, pattern):
    wrong, count = re.subn(pattern, r"\g<1>1" + PORT, source())
    assert count == 1, f"PORT's default not found in {copy}"
    assert out_of_step(copy, parse(wrong), canonical_settings()) == [
        f"{copy} gives PORT the default '1{PORT}', the code '{PORT}'"]


SMALL_CANONICAL = {"HOST": "0.0.0.0", "MANIFEST_TTL": "60", "TLS_CERT": "", "TLS_KEY": "",
                   "UPSTREAM_<ROUTE>": None, "UPSTREAM_<ROUTE>_PASSWORD": ""}
SMALL_PROBLEMS = ["X does not list TLS_KEY",
                  "X gives MANIFEST_TTL the default '60s', the code '60'",
                  "X lists EXTRA, which is not a setting"]

SMALL_COPIES = [
    (docstring_settings, """Intro.

Settings (flag > environment > default):
  HOST=0.0.0.0            address
  MANIFEST_TTL=60s        seconds; EXTRA=1 in the text is not a setting
  TLS_CERT=               certificate
  EXTRA=1                 not a setting
  UPSTREAM_<ROUTE>=       another URL
  UPSTREAM_<ROUTE>_PASSWORD=
                          TLS_KEY= on a continuation line does not count

TLS_KEY=  after the list does not count either
"""),
    (help_settings, """options:
  --host HOST  address (env HOST, default 0.0.0.0)
  --manifest-ttl MANIFEST_TTL
               seconds (env
               MANIFEST_TTL, default 60s)
  --tls-cert TLS_CERT  certificate (env TLS_CERT, default empty)
  --extra EXTRA  (env EXTRA, default 1)
  --upstream ROUTE=URL  (env UPSTREAM_<ROUTE>, default the registry's own)
UPSTREAM_<ROUTE>_PASSWORD (environment only). TLS_KEY is not a flag here.
"""),
    (readme_settings, """| Environment | Flag | Default | Meaning |
|---|---|---|---|
| `HOST` | `--host` | `0.0.0.0` | Address. |
| `MANIFEST_TTL` | `--manifest-ttl` | `60s` | Seconds. |
| `TLS_CERT` | `--tls-cert` | empty | Certificate. |
| `EXTRA` | `--extra` | `1` | Not a setting. |
| `UPSTREAM_<ROUTE>` | `--upstream` | the registry's own | URL. |
| `UPSTREAM_<ROUTE>_PASSWORD` | - | empty | Password. |

| `TLS_KEY` | after the table | empty | does not count |
"""),
    (env_example_settings, """# Settings. Format: KEY=VALUE lines.
# HOST=0.0.0.0
# MANIFEST_TTL=60s
# TLS_CERT=
# TLS_CERT=/etc/example.pem
EXTRA=1
# UPSTREAM_DOCKER=http://127.0.0.1:5000
# UPSTREAM_K8S_GCR_PASSWORD=
# Key (TLS_KEY=) in a comment does not count.
"""),
]


@pytest.mark.parametrize("parse, text", SMALL_COPIES, ids=[copy[0].__name__ for copy in SMALL_COPIES])
def test_settings_parsers_and_comparison_on_small_copies(parse, text):
    """Each parser on a copy with a missing setting, a wrong default and a stray name."""
    assert sorted(out_of_step("X", parse(text), SMALL_CANONICAL)) == SMALL_PROBLEMS


# README links ##############################################################

def github_anchor(heading):
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


@pytest.mark.parametrize("name", ["README.md", "bench/README.md"])
def test_readme_in_page_links_lead_to_headings(name):
    text = read(name)
    prose = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    anchors = {github_anchor(line.lstrip("#")) for line in prose.splitlines() if line.startswith("#")}
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert not sorted(set(links) - anchors), f"{name} links to missing headings"
    for target, anchor in re.findall(r"\]\(([\w./-]+\.md)#([^)]+)\)", prose):
        other = os.path.normpath(os.path.join(os.path.dirname(name), target))
        other_prose = re.sub(r"^ *```.*?^ *```", "", read(other), flags=re.S | re.M)
        other_anchors = {github_anchor(line.lstrip("#")) for line in other_prose.splitlines() if line.startswith("#")}
        assert anchor in other_anchors, f"{name} links to {target}#{anchor}, which has no such heading"
