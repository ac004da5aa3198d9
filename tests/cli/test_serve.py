"""`grok1 serve`'s key and exposure options, checked before anything is loaded."""

from grok1.cli.main import build_parser, main
from grok1.cli.serve import api_key


def key_of(argv, monkeypatch, env=None):
    monkeypatch.delenv("GROK1_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("GROK1_API_KEY", env)
    return api_key(build_parser().parse_args(["serve", *argv]))


def test_the_key_comes_from_the_command_line_a_file_or_the_environment(tmp_path, monkeypatch):
    assert key_of([], monkeypatch) is None
    assert key_of(["--api-key", "abc"], monkeypatch) == "abc"
    (tmp_path / "key").write_text("from-file\n")
    assert key_of(["--api-key-file", str(tmp_path / "key")], monkeypatch, env="ignored") == "from-file"
    assert key_of([], monkeypatch, env="from-env") == "from-env"  # not visible to `ps`


def test_an_empty_key_is_refused_not_a_lock_out(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GROK1_API_KEY", raising=False)
    (tmp_path / "empty").write_text("\n")
    for argv, env, source in [(["--api-key", ""], None, "--api-key"), (["--api-key", "  "], None, "--api-key"),
                              (["--api-key-file", str(tmp_path / "empty")], None, "--api-key-file"),
                              ([], "", "GROK1_API_KEY")]:
        if env is not None:
            monkeypatch.setenv("GROK1_API_KEY", env)
        assert main(["serve", "--checkpoint", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert "the API key is empty" in err and source in err and "Traceback" not in err, err


def test_listening_on_every_address_without_a_key_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GROK1_API_KEY", raising=False)
    missing = str(tmp_path / "nothing")  # fails right after the warning, before loading anything
    assert main(["serve", "--host", "0.0.0.0", "--checkpoint", missing]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--api-key", "k", "--checkpoint", missing]) == 2
    assert main(["serve", "--checkpoint", missing]) == 2  # loopback: no warning
    assert "without an API key" not in capsys.readouterr().err
