"""Tests for corral.inventory.noderange."""

from __future__ import annotations

import random

import pytest

from corral.errors import UsageError
from corral.inventory.noderange import MAX_NODES, NodeRangeError, expand, fold, is_noderange


def test_simple_range_keeps_padding() -> None:
    names = expand("n[001-100]")
    assert len(names) == 100
    assert names[0] == "n001"
    assert names[-1] == "n100"


def test_padding_comes_from_lower_bound() -> None:
    assert expand("n[1-10]") == [f"n{i}" for i in range(1, 11)]
    assert expand("n[08-11]") == ["n08", "n09", "n10", "n11"]
    assert expand("n[098-101]") == ["n098", "n099", "n100", "n101"]
    assert expand("n[0-2]") == ["n0", "n1", "n2"]


def test_cartesian_product_outer_left_slowest() -> None:
    names = expand("r[1-4]n[01-32]")
    assert len(names) == 128
    assert names[:3] == ["r1n01", "r1n02", "r1n03"]
    assert names[31:33] == ["r1n32", "r2n01"]
    assert names[-1] == "r4n32"


def test_bracket_with_suffix_and_leading_bracket() -> None:
    assert expand("n[1-2]-ib") == ["n1-ib", "n2-ib"]
    assert expand("[1-2]x") == ["1x", "2x"]


def test_comma_list_inside_bracket() -> None:
    assert expand("n[1-3,7,10-11]") == ["n1", "n2", "n3", "n7", "n10", "n11"]


def test_top_level_union_and_exclusion() -> None:
    names = expand("n[001-010],n050,-n005")
    assert names == [f"n{i:03d}" for i in (1, 2, 3, 4, 6, 7, 8, 9, 10, 50)]


def test_exclusion_applies_to_result_so_far_only() -> None:
    assert expand("-n1,n1") == ["n1"]
    assert expand("n[1-3],-n2,n2") == ["n1", "n3", "n2"]
    assert expand("n[1-4],-n[2-3]") == ["n1", "n4"]


def test_duplicates_removed_first_appearance_kept() -> None:
    assert expand("n3,n[1-4],n2,n[2-3]") == ["n3", "n1", "n2", "n4"]


def test_plain_names() -> None:
    assert expand("head") == ["head"]
    assert expand("node7,head,login_1.a-b") == ["node7", "head", "login_1.a-b"]
    assert expand("7up") == ["7up"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("n[1-3", "unbalanced '['"),
        ("n1-3]", "unbalanced ']'"),
        ("n]1[", "unbalanced ']'"),
        ("n1,,n2", "empty"),
        ("n1,", "empty"),
        (",n1", "empty"),
        ("", "empty"),
        ("n1,-", "empty"),
        ("n[]", "empty range in '[]'"),
        ("n[1,,2]", "empty range in '[1,,2]'"),
        ("n[5-1]", "range 5-1 is descending"),
        ("n[a-b]", "'a-b'"),
        ("n[1-x]", "'1-x'"),
        ("n[-3]", "'-3'"),
        ("n[1-]", "'1-'"),
        ("n[1-2-3]", "'1-2-3'"),
        ("n[1-[2]]", "nested bracket"),
        ("n 1", "invalid character ' '"),
        ("n/1", "invalid character '/'"),
        ("nö1", "invalid character 'ö'"),
        ("n[1-2]@x", "invalid character '@'"),
        ("_n1", "'_n1' must start with a letter or digit"),
        ("--n1", "'-n1' must start with a letter or digit"),
        (".n[1-2]", "'.n[1-2]' must start with a letter or digit"),
    ],
)
def test_errors_name_problem_and_text(text: str, fragment: str) -> None:
    with pytest.raises(NodeRangeError) as info:
        expand(text)
    message = str(info.value)
    assert message.startswith(f"bad noderange '{text}': ")
    assert fragment in message
    assert "\n" not in message


def test_exact_error_message() -> None:
    with pytest.raises(
        NodeRangeError, match=r"^bad noderange 'n\[5-1\]': range 5-1 is descending$"
    ):
        expand("n[5-1]")


def test_error_is_a_usage_error() -> None:
    assert issubclass(NodeRangeError, UsageError)
    assert NodeRangeError("x").exit_code == 2


def test_limit_is_checked_before_generating() -> None:
    # A 10**16-name product could not be generated at all: only counting can reject it.
    with pytest.raises(NodeRangeError) as info:
        expand("n[1-99999999]m[1-99999999]")
    assert "n[1-99999999]" in str(info.value)
    with pytest.raises(NodeRangeError) as info:
        expand("n[1-99999999]")
    message = str(info.value)
    assert "n[1-99999999]" in message
    assert "99999999" in message
    assert str(MAX_NODES) in message


def test_limit_on_huge_product_and_exclusion() -> None:
    with pytest.raises(NodeRangeError, match="1000000000000 names"):
        expand("r[1-1000000]n[1-1000000]")
    with pytest.raises(NodeRangeError, match="limit 100000"):
        expand("n[1-5],-n[1-99999999]")


def test_limit_counts_the_union() -> None:
    assert len(expand("n[1-60000],n[1-60000]")) == 60000
    with pytest.raises(NodeRangeError, match="would expand to 120000 names"):
        expand("n[1-60000],m[1-60000]")
    assert len(expand("n[1-100000]")) == MAX_NODES


def test_custom_limit() -> None:
    assert expand("n[1-5]", limit=5) == ["n1", "n2", "n3", "n4", "n5"]
    with pytest.raises(NodeRangeError, match=r"6 names \(limit 5\)"):
        expand("n[1-6]", limit=5)


def test_fold_examples() -> None:
    assert fold(["n001", "n002", "n003", "n005"]) == "n[001-003,005]"
    assert fold(["r1n01", "r1n02"]) == "r1n[01-02]"
    assert fold(["n001"]) == "n001"
    assert fold(["head", "login"]) == "head,login"
    assert fold([]) == ""


def test_fold_sorts_by_prefix_then_number() -> None:
    assert fold(["n10", "head", "m2", "n9", "n1", "m1"]) == "head,m[1-2],n[1,9-10]"
    assert fold(["n3", "n1", "n2", "n1"]) == "n[1-3]"


def test_fold_across_widths() -> None:
    assert fold([f"n{i}" for i in range(1, 11)]) == "n[1-10]"
    assert fold(["n08", "n09", "n10", "n11"]) == "n[08-11]"
    assert fold(["n098", "n099", "n100"]) == "n[098-100]"
    assert fold(["n1", "n01", "n001"]) == "n[1,01,001]"
    assert fold(["n9", "n010"]) == "n[9,010]"


def test_fold_only_last_numeric_run() -> None:
    assert fold(["r1n01", "r1n02", "r2n01"]) == "r1n[01-02],r2n01"
    assert fold(["n1-ib", "n2-ib"]) == "n1-ib,n2-ib"
    assert fold(["12", "13"]) == "[12-13]"


def test_fold_rejects_invalid_names() -> None:
    with pytest.raises(NodeRangeError, match="'n\\[1\\]'"):
        fold(["n[1]"])


def test_is_noderange() -> None:
    assert is_noderange("n[1-2]")
    assert is_noderange("n1,n2")
    assert is_noderange("-n1")
    assert not is_noderange("n1")
    assert not is_noderange("head-1")


def _random_name(rng: random.Random) -> str:
    prefix = rng.choice(["n", "r1n", "cn-", "gpu_", "x.y", "", "head", "a1b"])
    if rng.random() < 0.1:
        return rng.choice(["head", "login", "mgmt-a", "io.ib"])
    number = rng.choice([rng.randint(0, 20), rng.randint(90, 110), rng.randint(995, 1005)])
    width = rng.choice([1, 1, 2, 3, 4])
    name = f"{prefix}{number:0{width}d}"
    return name + rng.choice(["", "", "", "-ib"])


def test_fold_round_trip_property() -> None:
    rng = random.Random(20240611)
    for _ in range(400):
        names = [_random_name(rng) for _ in range(rng.randint(1, 40))]
        folded = fold(names)
        assert set(expand(folded)) == set(names), folded
        assert len(expand(folded)) == len(set(names))
        assert fold(expand(folded)) == folded


def test_expand_then_fold_round_trip() -> None:
    for text in ["n[001-100]", "r[1-4]n[01-32]", "n[1-3,7,10-11]", "n[8-12]"]:
        assert set(expand(fold(expand(text)))) == set(expand(text))
    assert fold(expand("n[001-010],n050,-n005")) == "n[001-004,006-010,050]"
