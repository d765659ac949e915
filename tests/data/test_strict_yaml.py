"""lvita_data.strict_yaml: strict YAML -> dataclasses, shared by manifests and training configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lvita_data.errors import ManifestError, UnsetVariableError
from lvita_data.strict_yaml import build_dataclass, expand_env, resolve_path


class OwnError(ValueError):
    """A config's own error class, raised by its checks."""


@dataclass(frozen=True, kw_only=True)
class Inner:
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise OwnError(f"inner.size must be >= 1, got {self.size}")


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=list)


def test_unknown_missing_and_wrongly_typed_keys_name_the_field():
    with pytest.raises(ManifestError, match=r"unknown key\(s\) \['nme'\]"):
        build_dataclass(Outer, {"nme": "a"})
    with pytest.raises(ManifestError, match=r"missing key\(s\) \['name'\]"):
        build_dataclass(Outer, {})
    with pytest.raises(ManifestError, match=r"sizes\[1\]: expected int"):
        build_dataclass(Outer, {"name": "a", "sizes": [1, "2"]})
    assert build_dataclass(Outer, {"name": "a", "inner": {"size": 3}}).inner.size == 3


def test_own_check_errors_get_the_field_path_when_declared():
    with pytest.raises(ManifestError, match=r"^inner: inner.size must be >= 1, got 0$"):
        build_dataclass(Outer, {"name": "a", "inner": {"size": 0}}, errors=(OwnError,))
    with pytest.raises(OwnError):  # undeclared: raised as is
        build_dataclass(Outer, {"name": "a", "inner": {"size": 0}})


def test_env_expansion_and_path_resolving(monkeypatch):
    monkeypatch.setenv("LVITA_TEST_ROOT", "/data")
    monkeypatch.delenv("LVITA_TEST_UNSET", raising=False)
    assert expand_env("${LVITA_TEST_ROOT}/x") == "/data/x"
    assert expand_env("${LVITA_TEST_UNSET:-d}/x") == "d/x"
    with pytest.raises(ManifestError, match="LVITA_TEST_UNSET is not set"):
        expand_env("${LVITA_TEST_UNSET}")
    assert build_dataclass(Outer, {"name": "${LVITA_TEST_ROOT}"}).name == "/data"
    assert resolve_path("a/../b", Path("/base")) == "/base/b"
    assert resolve_path("/abs", Path("/base")) == "/abs"
    assert resolve_path("~/x", Path("/base")) == str(Path.home() / "x")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Paths:
    path: str | list[str]


def test_an_unset_variable_is_named_with_its_field_not_as_a_type_mismatch(monkeypatch):
    monkeypatch.delenv("LVITA_TEST_UNSET", raising=False)
    with pytest.raises(UnsetVariableError) as error:
        build_dataclass(_Paths, {"path": "${LVITA_TEST_UNSET}/a.jsonl"}, "m.yaml")
    message = str(error.value)
    assert "path: environment variable LVITA_TEST_UNSET is not set" in message
    assert "matches none of" not in message
    assert isinstance(error.value, ManifestError)  # exit 2, like every manifest error
