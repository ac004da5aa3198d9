"""`grok1 plan` as a user types it: the README's commands and table, --json, and bad input."""

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from grok1.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main(["plan", *args])
    except SystemExit as e:  # argparse-level errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_fields(capsys):
    rc, out, _ = _plan(capsys, "--weights", "int8", "--devices", "8", "--memory-per-device", "80GB",
                       "--batch", "8", "--context", "8192", "--json")
    r = json.loads(out)
    assert rc == 0 and r["fits"] is True and (r["tp"], r["ep"]) == (8, 1)
    d = r["per_device"]
    assert d["weights_gb"] == 39.595 and d["kv_cache_gb"] == round(8 * 8192 * 256 * 1024 / 8 / 1e9, 3)
    assert d["activations_gb"] > 0 and d["total_gb"] == pytest.approx(
        d["weights_gb"] + d["kv_cache_gb"] + d["activations_gb"] + d["headroom_gb"], abs=0.005)


def test_given_split_that_does_not_fit_names_one_that_does(capsys):
    rc, out, _ = _plan(capsys, "--devices", "8", "--memory-per-device", "48GB", "--tp", "2", "--ep", "4", "--json")
    r = json.loads(out)
    assert rc == 0 and not r["fits"] and (r["tp"], r["ep"]) == (2, 4)
    assert (r["best_fitting"]["tp"], r["best_fitting"]["ep"], r["best_fitting"]["fits"]) == (8, 1, True)


def test_one_box(capsys):
    rc, out, _ = _plan(capsys, "--devices", "1", "--memory-per-device", "256GB", "--json")
    assert rc == 0 and json.loads(out)["one_box"]["mode"] == "memory-mapped"
    rc, out, _ = _plan(capsys, "--devices", "1", "--memory-per-device", "512GB")
    assert rc == 0 and "one box: the weights fit in RAM" in out


def test_readme_commands_print_what_the_readme_shows(capsys):
    """Every `grok1 plan` command in the README's section, run as written, prints the output pasted under it."""
    section = (ROOT / "README.md").read_text().split("## Planning memory", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(r"```bash\n(grok1 plan [^\n]*)\n```\n```\n(.*?)\n```", section, re.DOTALL)
    assert len(pairs) == 2
    for command, shown in pairs:
        rc, out, _ = _plan(capsys, *command.split()[2:])
        assert rc == 0 and out.rstrip() == shown, command


def test_readme_table_is_the_script_output(capsys):
    table = runpy.run_path(str(ROOT / "scripts" / "plan_table.py"))["table"]()
    capsys.readouterr()
    assert table in (ROOT / "README.md").read_text()


BAD = [
    (["--memory-per-device", "80"], "--memory-per-device '80'"),
    (["--memory-per-device", "lots"], "--memory-per-device 'lots'"),
    (["--memory-per-device", "80XB"], "80XB"),
    (["--devices", "3"], "--devices 3"),
    (["--devices", "0"], "--devices"),
    (["--devices", "eight"], "--devices"),
    (["--devices", "8", "--tp", "3"], "--tp 3"),
    (["--devices", "8", "--tp", "2", "--ep", "2"], "TP x EP must equal --devices 8"),
    (["--devices", "16", "--tp", "16", "--ep", "1"], "KV heads"),
    (["--devices", "8", "--ep", "3"], "--ep 3"),
    (["--weights", "fp8"], "--weights 'fp8'"),
    (["--preset", "grok-2"], "unknown preset 'grok-2'"),
    (["--context", "9000"], "--context 9000"),
    (["--batch", "0"], "--batch"),
    (["--preset", "grok-1-mini", "--weights", "int4", "--devices", "1"], "344"),
]


@pytest.mark.parametrize("args,names", BAD)
def test_bad_input_is_one_line_and_exit_2(capsys, args, names):
    rc, out, err = _plan(capsys, *args)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("grok1 plan: error: ") and names in err, err


def test_through_python_m_grok1():
    bad = subprocess.run([sys.executable, "-m", "grok1", "plan", "--memory-per-device", "80"],
                         check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and not bad.stdout
    good = subprocess.run([sys.executable, "-m", "grok1", "plan", "--devices", "4", "--memory-per-device",
                           "141GB", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(good.stdout)["fits"] is True
