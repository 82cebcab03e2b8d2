"""sinkhole.yaml's `tcp` section: defaults, accepted values, and errors naming file, line and field."""
import pytest

from resolver.config import PolicyError, TcpConfig, load_config

HEAD = "upstreams: ['192.0.2.1']\n"


def load(tmp_path, text):
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + text)
    return path, load_config(path)


def test_defaults(tmp_path):
    _, config = load(tmp_path, "")
    assert config.tcp == TcpConfig(max_connections=256, idle_timeout=10.0, max_queries=1000, max_lifetime=120.0)


def test_max_lifetime_is_read(tmp_path):
    _, config = load(tmp_path, "tcp:\n  idle_timeout: 5\n  max_lifetime: 30\n")
    assert (config.tcp.idle_timeout, config.tcp.max_lifetime, config.tcp.max_queries) == (5.0, 30.0, 1000)


@pytest.mark.parametrize("value, message", [
    ("0", "tcp.max_lifetime must be seconds > 0"),
    ("-5", "tcp.max_lifetime: -5 is not a valid float"),
    ("two minutes", "tcp.max_lifetime: 'two minutes' is not a valid float"),
    ("true", "tcp.max_lifetime: True is not a valid float"),
])
def test_bad_max_lifetime_names_file_line_and_field(tmp_path, value, message):
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + f"tcp:\n  max_connections: 10\n  max_lifetime: {value}\n")
    with pytest.raises(PolicyError) as e:
        load_config(path)
    assert [(p.path, p.line, p.message) for p in e.value.problems] == [(str(path), 4, message)]


def test_unknown_tcp_key_is_an_error(tmp_path):
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + "tcp:\n  max_lifetme: 30\n")
    with pytest.raises(PolicyError) as e:
        load_config(path)
    assert [p.line for p in e.value.problems] == [3] and "max_lifetme" in e.value.problems[0].message


@pytest.mark.parametrize("value, expected", [("0", 0), ("5000", 5000), ("", 1 << 17)])
def test_cache_answers(tmp_path, value, expected):
    _, config = load(tmp_path, f"cache:\n  answers: {value}\n" if value else "")
    assert config.cache.answers == expected


def test_negative_cache_answers_names_file_line_and_field(tmp_path):
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + "cache:\n  size: 10\n  answers: -1\n")
    with pytest.raises(PolicyError) as e:
        load_config(path)
    assert [(p.path, p.line) for p in e.value.problems] == [(str(path), 4)]
    assert "cache.answers" in e.value.problems[0].message
