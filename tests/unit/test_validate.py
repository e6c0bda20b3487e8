"""corral.render.validate: kickstarts through pykickstart, GRUB via grub-script-check."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

import pykickstart.parser
import pytest
from pykickstart.errors import KickstartParseError
from pykickstart.version import makeVersion

from corral.render import kscheck as validate
from corral.render.validate import (
    KickstartValidator,
    Problem,
    check_grub,
    check_kickstarts,
    get_validator,
)

# A clean RHEL9 kickstart of the kind corral generates. Line numbers matter below.
KICKSTART = """\
# corral: kickstart for n001
text
url --url=http://10.0.0.1/repos/rhel9/BaseOS
network --device=52:54:00:00:00:01 --bootproto=static --ip=10.0.0.11 --netmask=255.255.255.0 \
--gateway=10.0.0.1 --hostname=n001.cluster --activate
rootpw --iscrypted $6$corral$PbLm5SxMfAq9wCkPRf0ZmYb4u1q5iN8bGqk2X2kZl3uYz1e7j0X2h9sVx1e8Qm.
lang en_US.UTF-8
keyboard --vckeymap=us
timezone Etc/UTC --utc
bootloader --location=mbr --boot-drive=sda
zerombr
clearpart --all --initlabel --drives=sda
part /boot --fstype=xfs --size=1024 --ondisk=sda
part swap --fstype=swap --size=4096 --ondisk=sda
part / --fstype=xfs --size=10240 --grow --ondisk=sda
reboot

%packages
@core
chrony
%end

%pre --interpreter=/bin/bash --log=/tmp/corral-pre.log
echo "pre-install for n001"
%end

%post --log=/root/post.log
echo "installed" > /etc/motd
%end

%onerror
echo "installation failed"
%end
"""
LINES = KICKSTART.splitlines()

# Many commands and options at once, valid for RHEL9, RHEL10 and F40.
RICH = """\
text
url --url=http://10.0.0.1/rhel9/BaseOS --proxy=http://proxy:3128
repo --name=AppStream --baseurl=http://10.0.0.1/rhel9/AppStream
repo --name=extras --baseurl=http://10.0.0.1/extras --cost=50 --install
network --device=52:54:00:00:00:01 --bootproto=static --ip=10.0.0.11 --netmask=255.255.255.0 \
--gateway=10.0.0.1 --nameserver=10.0.0.2,10.0.0.3 --onboot=yes --activate
network --device=bond0 --bondslaves=eth1,eth2 --bondopts=mode=802.3ad,miimon=100 \
--bootproto=dhcp --onboot=yes
network --device=eth3 --vlanid=42 --bootproto=dhcp --onboot=no
network --hostname=n001.cluster
rootpw --iscrypted $6$x$y
user --name=ops --groups=wheel,adm --uid=1500 --iscrypted --password=$6$a$b
group --name=cluster --gid=3000
sshkey --username=ops "ssh-ed25519 AAAAC3Nza ops@corral"
lang en_US.UTF-8 --addsupport=de_DE.UTF-8,fr_FR.UTF-8
keyboard --vckeymap=us --xlayouts=us,de
timezone Europe/Berlin --utc
timesource --ntp-server=10.0.0.1
services --enabled=sshd,chronyd --disabled=kdump
firewall --enabled --service=ssh,http --port=8080:tcp
selinux --enforcing
firstboot --disable
skipx
ignoredisk --only-use=sda,sdb
bootloader --location=mbr --boot-drive=sda --append="console=ttyS0,115200 crashkernel=auto"
zerombr
clearpart --all --initlabel --drives=sda,sdb
part /boot --fstype=xfs --size=1024 --ondisk=sda
part raid.01 --size=20000 --ondisk=sda
part raid.02 --size=20000 --ondisk=sdb
raid pv.01 --level=1 --device=md0 raid.01 raid.02
volgroup vg0 pv.01 --pesize=4096
logvol / --vgname=vg0 --name=root --fstype=xfs --size=10000 --grow
logvol swap --vgname=vg0 --name=swap --size=2048
logvol /var --vgname=vg0 --name=var --fstype=xfs --size=4096
reboot --eject

%packages --exclude-weakdeps --inst-langs=en_US
@^minimal-environment
@core --nodefaults
@Development Tools --optional
chrony
-kdump
-@dial-up
%end

%pre --interpreter=/usr/bin/bash
echo pre
%end

%post --nochroot --log=/mnt/sysroot/root/nochroot.log
cp /etc/resolv.conf /mnt/sysroot/etc/
%end

%post --interpreter=/usr/bin/python3 --erroronfail
print("hi")
%end

%onerror
echo failed
%end

%addon com_redhat_kdump --disable
%end
"""


def line_of(prefix: str, text: str = KICKSTART) -> int:
    """1-based number of the first line starting with ``prefix``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(prefix))


def node_kickstart(n: int) -> str:
    """KICKSTART for node n: its own name, address and MAC."""
    return (
        KICKSTART.replace("n001", f"n{n:04d}")
        .replace("10.0.0.11 ", f"10.0.{n // 250}.{n % 250 + 1} ")
        .replace("52:54:00:00:00:01", f"52:54:00:00:{n // 256:02x}:{n % 256:02x}")
    )


def replace_line(prefix: str, new: str, text: str = KICKSTART) -> str:
    lines = text.splitlines(True)
    at = line_of(prefix, text) - 1
    lines[at] = new + "\n"
    return "".join(lines)


def insert_after(prefix: str, new: str, text: str = KICKSTART) -> str:
    lines = text.splitlines(True)
    lines.insert(line_of(prefix, text), new + "\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def rhel9() -> KickstartValidator:
    return KickstartValidator("RHEL9")


# --------------------------------------------------------------------------------------
# Kickstart: single files
# --------------------------------------------------------------------------------------


def test_valid_kickstart_passes(rhel9: KickstartValidator) -> None:
    assert rhel9.check(KICKSTART, "kickstart/n001.ks") is None


@pytest.mark.parametrize("version", ["RHEL8", "RHEL9", "RHEL10", "F40", "rhel9", "DEVEL"])
def test_valid_kickstart_passes_for_other_versions(version: str) -> None:
    assert get_validator(version).check(KICKSTART, "kickstart/n001.ks") is None


NO_PACKAGES_END = KICKSTART.replace("chrony\n%end\n", "chrony\n", 1)

BAD_KICKSTARTS = {
    "unknown command": (
        replace_line("reboot", "rebooot"),
        line_of("reboot"),
        "Unknown command: rebooot",
    ),
    "unknown option": (
        replace_line("part / ", "part / --fstype=xfs --bogus"),
        line_of("part / "),
        "Unexpected arguments to partition command: ['--bogus']",
    ),
    "bad option value": (
        replace_line("part swap", "part swap --size=big"),
        line_of("part swap"),
        "argument --size: invalid int value: 'big'",
    ),
    "unknown section": (
        insert_after("%end", "%bogus\nsomething\n%end"),
        line_of("%end") + 1,
        "Unknown kickstart section: %bogus",
    ),
    "duplicate partition": (
        insert_after("part / ", "part / --fstype=ext4 --size=500"),
        line_of("part / ") + 1,
        "warning: A partition with the mountpoint / has already been defined.",
    ),
    "duplicate network device": (
        insert_after("network ", "network --device=52:54:00:00:00:01 --bootproto=dhcp"),
        line_of("network ") + 1,
        "warning: A network device with the name 52:54:00:00:00:01 has already been defined.",
    ),
    "missing %end at end of file": (
        KICKSTART + "%post\necho unterminated\n",
        len(LINES) + 2,
        "Section %post does not end with %end.",
    ),
    "missing %end before the next section": (
        NO_PACKAGES_END,
        line_of("%pre", NO_PACKAGES_END),
        "Section %packages does not end with %end.",
    ),
    "unbalanced quote": (
        replace_line("lang ", 'lang "en_US.UTF-8'),
        line_of("lang "),
        "No closing quotation",
    ),
    "deprecated %traceback (RHEL9)": (
        KICKSTART + "%traceback\necho traceback\n%end\n",
        len(LINES) + 1,
        "warning: The %traceback section has been deprecated.",
    ),
    "deprecated option": (
        replace_line("%packages", "%packages --instLangs=en_US"),
        line_of("%packages"),
        "warning: The --instLangs option on line",
    ),
}


@pytest.mark.parametrize(
    ("text", "line", "message"), BAD_KICKSTARTS.values(), ids=list(BAD_KICKSTARTS)
)
def test_bad_kickstart_reports_line_and_message(
    rhel9: KickstartValidator, text: str, line: int, message: str
) -> None:
    problem = rhel9.check(text, "kickstart/n001.ks")
    assert problem is not None
    assert problem.path == "kickstart/n001.ks"
    assert problem.line == line, problem
    assert problem.message.startswith(message), problem
    assert "\n" not in problem.message


def test_only_the_first_problem_is_reported(rhel9: KickstartValidator) -> None:
    text = replace_line("lang ", "langg en_US")
    text = replace_line("reboot", "rebooot", text)
    problem = rhel9.check(text, "ks")
    assert problem == Problem("ks", line_of("lang"), "Unknown command: langg")


def test_empty_kickstart_is_valid(rhel9: KickstartValidator) -> None:
    assert rhel9.check("", "ks") is None


def test_pykickstart_crash_is_a_problem(rhel9: KickstartValidator) -> None:
    # pykickstart indexes the first word of a line: an empty quoted word crashes it.
    problem = rhel9.check('text\n""\n', "ks")
    assert problem is not None
    assert problem.line == 2
    assert problem.message.startswith("pykickstart failed: IndexError")


def test_includes_are_not_followed(rhel9: KickstartValidator) -> None:
    text = insert_after("clearpart", "%include /tmp/part-include")
    assert rhel9.check(text, "ks") is None


def test_no_warning_reaches_stderr(
    rhel9: KickstartValidator, capfd: pytest.CaptureFixture[str]
) -> None:
    for text, _, _ in BAD_KICKSTARTS.values():
        rhel9.check(text, "ks")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_unknown_version_raises_value_error_naming_valid_ones() -> None:
    with pytest.raises(ValueError, match="RHEL9") as info:
        KickstartValidator("RHEL99")
    assert "\n" not in str(info.value)
    assert "'RHEL99'" in str(info.value)
    with pytest.raises(ValueError):
        check_kickstarts([("RHEL9", "a", KICKSTART), ("centos", "b", KICKSTART)])


# --------------------------------------------------------------------------------------
# Kickstart: reuse of one validator
# --------------------------------------------------------------------------------------

# Files that leave traces in a handler: lists of partitions, networks, users, scripts,
# packages; failures in the middle of a command or of a section.
LEAKY = [
    insert_after("part / ", "part / --size=1"),  # duplicate warning, parse stops there
    insert_after("part / ", "part /home --size=1"),
    insert_after("network ", "network --device=eth1 --bootproto=dhcp --onboot=no"),
    insert_after(
        "rootpw", "user --name=ops --groups=wheel\nsshkey --username=ops 'ssh-ed25519 AAA'"
    ),
    insert_after("rootpw", "services --enabled=sshd --disabled=kdump\nselinux --permissive"),
    insert_after("rootpw", "firewall --enabled --service=ssh\nfirstboot --disable"),
    insert_after("rootpw", "repo --name=extras --baseurl=http://10.0.0.1/extras"),
    KICKSTART.replace("clearpart --all --initlabel --drives=sda", "ignoredisk --only-use=sda"),
    KICKSTART + "%post --nochroot\necho half\n",  # unterminated section with a body
    KICKSTART + "%packages --exclude-weakdeps\n-kdump\n%end\n",
    "#platform=x86, AMD64, or Intel EM64T\n" + KICKSTART,
    replace_line("part / ", "part / --fstype=xfs --size=abc"),  # fails inside a command
    KICKSTART.replace("%onerror", "%traceback"),
]


def test_previous_file_does_not_change_the_result() -> None:
    # Each file's result from a validator that has just checked another file (and many
    # before it) equals its result from a validator that never checked anything.
    files = [KICKSTART, *LEAKY]
    fresh = [KickstartValidator("RHEL9").check(text, "b") for text in files]
    assert fresh[0] is None and any(fresh)
    reused = KickstartValidator("RHEL9")
    for first in files:
        for second, expected in zip(files, fresh, strict=True):
            reused.check(first, "a")
            assert reused.check(second, "b") == expected


def test_duplicate_partitions_of_one_file_do_not_carry_into_the_next(
    rhel9: KickstartValidator,
) -> None:
    a = insert_after("part / ", "part / --size=2048")
    b = KICKSTART  # defines / once
    assert rhel9.check(a, "a") is not None
    assert rhel9.check(b, "b") is None
    assert rhel9.check(b, "b") is None  # b again: its own / must not count twice


def _command_states(handler: Any) -> dict[str, dict[str, Any]]:
    return {
        name: {k: v for k, v in vars(command).items() if k not in ("op", "handler")}
        for name, command in handler.commands.items()
        if command is not None
    }


def test_reset_handler_equals_a_fresh_one() -> None:
    validator = KickstartValidator("RHEL9")
    for _ in range(3):
        for text in [KICKSTART, *LEAKY, *(t for t, _, _ in BAD_KICKSTARTS.values())]:
            validator.check(text, "ks")
    used = validator._handler
    fresh = makeVersion("RHEL9")
    assert _command_states(used) == _command_states(fresh)
    assert str(used) == str(fresh)
    assert sorted(vars(used)) == sorted(vars(fresh))
    assert used.scripts == [] and used.certificates == [] and used.platform == ""


def test_command_parsers_have_no_mutable_defaults() -> None:
    # Reusing a command's argparse parser across files is only safe if parsing cannot
    # change it; a list or dict default could be appended to in place.
    for version in ["RHEL8", "RHEL9", "RHEL10", "F40"]:
        for name, command in makeVersion(version).commands.items():
            parser = getattr(command, "op", None)
            for action in parser._actions if parser is not None else []:
                assert not isinstance(action.default, list | dict | set), (version, name)


def test_section_parsers_are_built_once(rhel9: KickstartValidator) -> None:
    rhel9.check(KICKSTART, "a")
    cached = dict(validate._SECTION_PARSERS)
    sections = {cls.__mro__[2].__name__ for cls, version in cached if version == rhel9._number}
    assert sections >= {
        "PackageSection",
        "PreScriptSection",
        "PostScriptSection",
        "OnErrorScriptSection",
    }
    rhel9.check(node_kickstart(7), "b")
    assert cached == validate._SECTION_PARSERS
    assert all(validate._SECTION_PARSERS[key] is parser for key, parser in cached.items())


def test_memoised_split_matches_shlex_and_is_removed_afterwards(
    rhel9: KickstartValidator,
) -> None:
    samples = [
        'network --hostname="a b" # comment',
        "part / --fstype=xfs",
        "echo 'x y' \\\"z\\\"",
        "%post --log=/root/post.log",
        "",
    ]
    for line in samples:
        for comments in (False, True):
            got = validate._memo_split(line, comments)
            assert got == shlex.split(line, comments=comments)
            got.append("mutated")
            assert validate._memo_split(line, comments) == shlex.split(line, comments=comments)
    rhel9.check(replace_line("lang ", 'lang "broken'), "ks")
    assert pykickstart.parser.shlex is shlex


GROUP_LINES = [
    "core",
    "core --optional",
    "--nodefaults core",
    "Development Tools",
    "Development Tools --optional",
    "core --opt",
    "x --bogus",
    "a --nodefaults --optional",
    "b --optional=yes",
    "",
]


@pytest.mark.parametrize("line", GROUP_LINES)
def test_group_lines_are_handled_as_pykickstart_does(line: str) -> None:
    def outcome(packages: Any) -> object:
        try:
            packages.add(["@core", f"@{line}", "@core --nodefaults"])
        except Exception as exc:
            return type(exc), str(exc)
        return [(group.name, group.include) for group in packages.groupList]

    assert outcome(validate._Packages()) == outcome(pykickstart.parser.Packages())


@pytest.mark.parametrize("version", ["RHEL9", "RHEL10", "F40"])
def test_handler_data_is_what_pykickstart_alone_builds(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With every shortcut in place (memoised argument parsing and splitting, cached
    # section parsers, a reused handler), parsing builds the same kickstart data as
    # plain pykickstart does, also when all of it comes from the memos.
    validator = KickstartValidator(version)
    for text in [RICH, KICKSTART, node_kickstart(2), RICH]:
        validator.check(text, "warm")
    for text in [RICH, node_kickstart(5)]:
        fresh = makeVersion(version)
        pykickstart.parser.KickstartParser(fresh).readKickstartFromString(text)
        with monkeypatch.context() as patch:
            patch.setattr(validator, "_reset", lambda: None)
            assert validator.check(text, "ks") is None
        try:
            assert str(validator._handler) == str(fresh)
        finally:
            validator._reset()


def test_memoised_parse_returns_fresh_namespaces() -> None:
    handler = get_validator("RHEL9")._handler
    op = handler.commands["part"].op
    args = ["/", "--fstype=xfs", "--size=1024", "--extra"]
    plain = argparse.ArgumentParser.parse_known_args(op, list(args))
    first = op.parse_known_args(args=list(args), lineno=3)
    assert isinstance(op.__dict__["parse_known_args"], validate._MemoParse)
    assert first == plain
    assert first[0].mntpoint == ["/"] and first[1] == ["--extra"]
    assert op.lineno == 3
    first[0].mntpoint.append("mutated")
    first[1].append("mutated")
    vars(first[0])["added"] = 1
    second = op.parse_known_args(args=list(args), lineno=9)
    assert second == plain
    assert op.lineno == 9
    with pytest.raises(KickstartParseError):
        op.parse_args(args=["/", "--size"], lineno=4)  # failures are never stored
    assert ("/", "--size") not in op.parse_known_args.memo


def test_versions_do_not_interfere() -> None:
    rhel8, rhel9 = get_validator("RHEL8"), get_validator("RHEL9")
    traceback = KICKSTART + "%traceback\necho x\n%end\n"
    for _ in range(2):
        assert rhel8.check(traceback, "ks") is None  # deprecated only from F34 / RHEL9
        assert rhel9.check(traceback, "ks") is not None


# --------------------------------------------------------------------------------------
# Kickstart: batches
# --------------------------------------------------------------------------------------


def _batch(count: int, bad_at: int) -> list[tuple[str, str, str]]:
    items = [("RHEL9", f"kickstart/n{n:04d}.ks", node_kickstart(n)) for n in range(count)]
    bad = replace_line("part / ", "part / --fstype=xfs --bogus", node_kickstart(bad_at))
    items[bad_at] = ("RHEL9", items[bad_at][1], bad)
    return items


def test_check_kickstarts_in_process_and_in_a_pool_agree() -> None:
    items = _batch(600, bad_at=311)
    expected = [
        Problem(
            "kickstart/n0311.ks",
            line_of("part / "),
            "Unexpected arguments to partition command: ['--bogus']",
        )
    ]
    assert check_kickstarts(items, workers=1) == expected
    assert check_kickstarts(items, workers=2) == expected
    assert check_kickstarts(items) == expected


def test_check_kickstarts_keeps_input_order_and_mixed_versions() -> None:
    items = [
        ("RHEL9", "k/a.ks", replace_line("reboot", "rebooot")),
        ("RHEL8", "k/b.ks", KICKSTART),
        ("RHEL8", "k/c.ks", KICKSTART + "%post\n"),
        ("F40", "k/d.ks", KICKSTART),
        ("RHEL9", "k/e.ks", KICKSTART + "%traceback\n%end\n"),
    ]
    in_process = check_kickstarts(items)
    assert [p.path for p in in_process] == ["k/a.ks", "k/c.ks", "k/e.ks"]
    assert check_kickstarts(items, workers=2) == in_process


def test_check_kickstarts_empty() -> None:
    assert check_kickstarts([]) == []


# --------------------------------------------------------------------------------------
# GRUB
# --------------------------------------------------------------------------------------

needs_grub = pytest.mark.integration  # runs the real grub-script-check

GRUB = """\
# corral: GRUB network boot for n001 (kickstart)
set default=0
set timeout=0
menuentry "n001: kickstart" {
  linux /images/rhel9/vmlinuz inst.ks=http://10.0.0.1/ks/n001.ks ip=dhcp
  initrd /images/rhel9/initrd.img
}
"""

GRUB_LOCAL = """\
set default=0
set timeout=5
menuentry 'local disk' --id local {
  if [ "${grub_platform}" = "efi" ]; then
    exit
  else
    set root=(hd0)
    chainloader +1
  fi
}
"""

UNCLOSED_BRACE = GRUB.replace("}\n", "")
MISSING_FI = GRUB_LOCAL.replace("  fi\n", "")

# Files that are wrong alone but could be "completed" by the file after them if files
# were simply concatenated, and a file that closes what an earlier one left open.
INCOMPLETE = {
    "unclosed brace": UNCLOSED_BRACE,
    "missing fi": MISSING_FI,
    "open single quote": "set default=0\necho 'abc\n",
    "open double quote": 'set default=0\nmenuentry "n001 {\n  linux /vmlinuz\n}\n',
    "if without then": "set x=1\nif true\n",
    "function without body": "set x=1\nfunction f\n",
    "trailing backslash": "set default=0\nlinux /vmlinuz \\\n",
    "no trailing newline, open brace": "set x=1\nmenuentry x {",
}
CLOSERS = ["}\nset a=1\n", "fi\n", "'\nset a=1\n", '"\n}\n', "then true; fi\n", "{ true; }\n"]
NO_COMMANDS = {
    "only comments": "# nothing here\n\n",
    "empty": "",
    "only a function": "function f {\n  echo hi\n}\n",
}


def grub_item(n: int, text: str | None = None) -> tuple[str, str]:
    return f"grub/n{n:04d}.cfg", GRUB.replace("n001", f"n{n:04d}") if text is None else text


@pytest.mark.parametrize(
    "text", [GRUB, GRUB_LOCAL, GRUB.rstrip("\n"), "function f {\n  true\n}\nf\n"]
)
@pytest.mark.integration
@needs_grub
def test_grub_valid_script_passes(text: str) -> None:
    assert check_grub([("grub/n001.cfg", text)]) == []


@pytest.mark.parametrize(
    ("text", "line"),
    [(UNCLOSED_BRACE, UNCLOSED_BRACE.count("\n")), (MISSING_FI, MISSING_FI.count("\n"))],
    ids=["unclosed brace", "if without fi"],
)
@pytest.mark.integration
@needs_grub
def test_grub_error_has_label_and_line(text: str, line: int) -> None:
    [problem] = check_grub([("grub/n001.cfg", text)])
    assert problem.path == "grub/n001.cfg"
    assert problem.line == line
    assert problem.message.startswith("grub-script-check: syntax error")


@pytest.mark.integration
@needs_grub
def test_grub_error_in_the_middle_of_a_file() -> None:
    text = GRUB.replace("set timeout=0\n", "set timeout=0\n}\n")
    [problem] = check_grub([("g", text)])
    assert problem.line == 4


@pytest.mark.integration
@needs_grub
def test_grub_batch_of_300_reports_exactly_the_bad_file() -> None:
    items = [grub_item(n) for n in range(300)]
    items[150] = ("grub/n0150.cfg", MISSING_FI)
    alone = check_grub([items[150]])
    assert check_grub(items) == alone
    assert alone == [Problem("grub/n0150.cfg", MISSING_FI.count("\n"), alone[0].message)]


@pytest.mark.integration
@needs_grub
def test_grub_batch_with_several_bad_files() -> None:
    items = [grub_item(n) for n in range(1000)]
    bad = {3: UNCLOSED_BRACE, 4: MISSING_FI, 500: "}\n", 998: "echo 'x\n", 999: "fi\n"}
    for n, text in bad.items():
        items[n] = grub_item(n, text)
    problems = check_grub(items)
    assert [p.path for p in problems] == [items[n][0] for n in sorted(bad)]
    assert problems == [p for n in sorted(bad) for p in check_grub([items[n]])]


@pytest.mark.parametrize("closer", CLOSERS)
@pytest.mark.parametrize("bad", INCOMPLETE.values(), ids=list(INCOMPLETE))
@pytest.mark.integration
@needs_grub
def test_grub_concatenation_cannot_hide_an_error(bad: str, closer: str) -> None:
    items = [grub_item(0), ("bad", bad), ("closer", closer), grub_item(3)]
    one_by_one = [p for item in items for p in check_grub([item])]
    assert "bad" in {p.path for p in one_by_one}
    assert check_grub(items) == one_by_one


@pytest.mark.parametrize("closer", CLOSERS)
@pytest.mark.integration
@needs_grub
def test_grub_many_incomplete_files_in_one_batch(closer: str) -> None:
    items: list[tuple[str, str]] = []
    for name, text in INCOMPLETE.items():
        items += [grub_item(len(items)), (f"bad/{name}", text), (f"closer/{name}", closer)]
    items.append(grub_item(len(items)))
    one_by_one = [p for item in items for p in check_grub([item])]
    assert {p.path for p in one_by_one} >= {f"bad/{name}" for name in INCOMPLETE}
    assert check_grub(items) == one_by_one


@pytest.mark.integration
@needs_grub
def test_grub_file_without_commands_is_found_among_others() -> None:
    items = [grub_item(0)]
    for name, text in NO_COMMANDS.items():
        items += [(f"empty/{name}", text), grub_item(len(items) + 1)]
    problems = check_grub(items)
    assert [p.path for p in problems] == [f"empty/{name}" for name in NO_COMMANDS]
    assert all(p.message == "grub-script-check: script contains no commands" for p in problems)


@pytest.mark.integration
@needs_grub
def test_grub_file_without_final_newline_does_not_join_the_next() -> None:
    # "set x=1" + "fi" would become "set x=1fi" if glued together, hiding the stray fi.
    items = [("a", "set x=1"), ("b", "fi\nset y=2\n"), ("c", GRUB)]
    problems = check_grub(items)
    assert [(p.path, p.line) for p in problems] == [("b", 1)]


def test_grub_missing_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="grub-common"):
        check_grub([("grub/n001.cfg", GRUB)])


def test_grub_empty_input_needs_nothing() -> None:
    assert check_grub([]) == []
