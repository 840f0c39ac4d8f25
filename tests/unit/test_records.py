"""Records: construction, inheritance, defaults, errors, frozen-ness, eq/hash/repr, the
module functions, and that the build path loads neither dataclasses nor inspect."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest

from sysbake.records import FrozenInstanceError, field, fields, is_record, record, replace


@record
class Point:
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)


@record(kw_only=True)
class Base:
    kind: ClassVar[str]
    name: str
    mode: str = "boot"
    root: str = field(repr=False, metadata={"hidden": True})


@record(kw_only=True)
class Child(Base):
    kind: ClassVar[str] = "child"
    mode: str = "chroot"  # a redeclared base field: new default, same place
    extra: int
    note: str = field(default="", repr=False)


@record(kw_only=True)
class GrandChild(Child):
    last: bool = False


@record(frozen=False)
class State:
    items: list[int] = field(default_factory=list)


@record
class Checked:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("negative")


def test_positional_keyword_and_defaults() -> None:
    assert Point(1, 2) == Point(y=2, x=1) == Point(1, y=2)
    assert (Point(1).y, Point(1).tags) == (0, [])


def test_default_factory_gives_each_instance_its_own_object() -> None:
    a, b = Point(1), Point(1)
    a.tags.append("x")
    assert b.tags == []


def test_kw_only_refuses_positional_arguments() -> None:
    with pytest.raises(TypeError, match="takes 0 positional arguments"):
        Base("n", root="/")  # type: ignore[call-arg]
    assert Base(name="n", root="/").mode == "boot"


def test_inheritance_keeps_base_fields_first_and_takes_overridden_defaults() -> None:
    assert [f.name for f in fields(Child)] == ["name", "mode", "root", "extra", "note"]
    assert [f.name for f in fields(GrandChild)] == [f.name for f in fields(Child)] + ["last"]
    child = Child(name="n", root="/", extra=1)
    assert (child.mode, Base(name="n", root="/").mode) == ("chroot", "boot")
    assert GrandChild(name="n", root="/", extra=1).mode == "chroot"
    # As in dataclasses, a default is also a class attribute; field() itself is not.
    assert (Child.mode, Base.mode, Child.note) == ("chroot", "boot", "")
    assert not hasattr(Base, "root") and not hasattr(Point, "tags")


def test_classvar_is_not_a_field() -> None:
    assert "kind" not in {f.name for f in fields(Child)}
    assert Child.kind == "child"
    with pytest.raises(TypeError, match="unexpected keyword argument 'kind'"):
        Child(name="n", root="/", extra=1, kind="x")  # type: ignore[call-arg]


def test_missing_unexpected_and_repeated_arguments() -> None:
    with pytest.raises(TypeError, match=r"Point\(\) missing 1 required argument: 'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(
        TypeError,
        match=r"Child\(\) missing 2 required arguments: 'root', "
        "'extra'",
    ):
        Child(name="n")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        Point(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'x'"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 3 positional arguments but 4 were given"):
        Point(1, 2, [], 4)  # type: ignore[call-arg]


def test_frozen_records_refuse_assignment_and_deletion() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'x'"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError, match="cannot delete field 'x'"):
        del p.x
    state = State()
    state.items = [1]
    assert state.items == [1]


def test_eq_and_hash() -> None:
    a = Child(name="n", root="/", extra=1)
    b = Child(name="n", root="/", extra=1)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != replace(a, extra=2)
    same_values: object = (1, 0, [])
    assert Point(1) != same_values  # another class is never equal
    assert State() == State()
    with pytest.raises(TypeError, match="unhashable type: 'State'"):
        hash(State())


def test_repr_hides_repr_false_fields() -> None:
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=[])"
    assert repr(Child(name="n", root="/", extra=1)) == "Child(name='n', mode='chroot', extra=1)"


def test_replace_makes_a_new_checked_record() -> None:
    p = Point(1, 2, ["t"])
    q = replace(p, y=3)
    assert (q, p) == (Point(1, 3, ["t"]), Point(1, 2, ["t"]))
    with pytest.raises(ValueError, match="negative"):
        replace(Checked(1), value=-1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        replace(p, z=1)


def test_fields_and_is_record() -> None:
    root = fields(Base)[2]
    assert (root.name, root.repr, dict(root.metadata)) == ("root", False, {"hidden": True})
    assert fields(Point(1)) == fields(Point)
    assert fields(Point)[1].default == 0 and fields(Point)[2].default_factory is list
    assert dict(fields(Point)[0].metadata) == {}
    assert is_record(Point) and is_record(Point(1)) and not is_record(object())
    with pytest.raises(TypeError):
        fields(object())


def test_post_init_runs_after_the_fields_are_set() -> None:
    assert Checked(1).value == 1
    with pytest.raises(ValueError, match="negative"):
        Checked(-1)


def test_a_method_record_would_replace_is_refused() -> None:
    with pytest.raises(TypeError, match="defines __repr__"):

        @record
        class Own:
            x: int

            def __repr__(self) -> str:
                return "own"


def test_the_build_path_loads_neither_dataclasses_nor_inspect() -> None:
    code = (
        "import sys, sysbake.cli, sysbake.build.pipeline, sysbake.project.load, "
        "sysbake.build.steps, sysbake.build.salt.run, sysbake.runtime.monitor, "
        "sysbake.runtime.containers; "
        "print(sorted({'dataclasses', 'inspect'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
