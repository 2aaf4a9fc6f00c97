"""Hostile input, one table per edge where data enters dgxvm (STYLE 11): the Slurm environment
the Prolog reads, the job comment, the CLI's options, config files, image and domain names.

Every row says what must be refused and why. Each case asserts what users and admins rely on:
one line naming the bad value; the right exit status (the Prolog: 0 with the job cancelled, so
the node stays in service -- Slurm drains a node for any other status; the CLI: 2); and that
nothing was written to the ledger, libvirt, the state dir or Slurm beyond the refusal record.
Legitimate values (john.doe, Alice, a work dir with a space, quotes or é) must pass; that they
reach the guest unchanged is tests/unit/test_seed.py's round trip through the guest's reader.
"""

from __future__ import annotations

import grp
import os
import pwd

import libvirt
import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.cli.main import main
from slurm_dgxvm.errors import JobInputError, NotAJob
from slurm_dgxvm.names import account_name_problem, path_problem
from slurm_dgxvm.slurm.job import SlurmJob, create_request, is_job_fault
from test_slurm_hooks import ENV, World, image_store  # noqa: F401 - image_store is a fixture

KIB10 = 10 * 1024
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def world(tmp_path, trees, image_store):  # noqa: F811
    return World(tmp_path, trees, image_store)


def _nothing_but_the_refusal(world: World, tmp_path) -> None:
    """No state dir (ledger, VM dirs, failure files), no libvirt domain, and of Slurm only the
    AdminComment and the scancel."""
    assert not (tmp_path / "state").exists(), list((tmp_path / "state").rglob("*"))
    calls = world.calls()
    assert len(calls) == 2 and "AdminComment=" in calls[0] and calls[1] == "scancel 42", calls
    assert world.admin_comment()["state"] == "refused"
    conn = libvirt.open("test:///default")
    try:
        assert "job-42" not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


# -- the Slurm environment -------------------------------------------------------------------------
# (variable, value, what the line must show, why it is refused)
SLURM_ENV = [
    ("SLURM_JOB_WORK_DIR", "/tmp/a\nb", "'/tmp/a\\nb'", "control character"),
    ("SLURM_JOB_WORK_DIR", "/tmp/a\rb", "'/tmp/a\\rb'", "control character"),
    ("SLURM_JOB_WORK_DIR", "/tmp/\x1b[31mred", "'/tmp/\\x1b[31mred'", "control character"),
    ("SLURM_JOB_WORK_DIR", "/tmp/a\x7f", "'/tmp/a\\x7f'", "control character"),
    ("SLURM_JOB_WORK_DIR", "/tmp/a\x00b", "'/tmp/a\\x00b'", "control character"),
    ("SLURM_JOB_WORK_DIR", "/tmp/\udcff\udcfe", "'/tmp/\\udcff\\udcfe'", "not valid UTF-8"),
    ("SLURM_JOB_WORK_DIR", "work/dir", "'work/dir'", "not an absolute path"),
    ("SLURM_JOB_WORK_DIR", "../../etc", "'../../etc'", "not an absolute path"),
    ("SLURM_JOB_WORK_DIR", "/home/x/../../etc", "'/home/x/../../etc'", "'..' component"),
    ("SLURM_JOB_WORK_DIR", "/home/./x", "'/home/./x'", "'..' component"),
    ("SLURM_JOB_WORK_DIR", "/home//x", "'/home//x'", "contains '//'"),
    ("SLURM_JOB_WORK_DIR", "/home/x/", "'/home/x/'", "ends with '/'"),
    ("SLURM_JOB_WORK_DIR", "/" + "a" * KIB10, "'/aaaa", "longer than 4095 bytes"),
    ("SLURM_JOB_WORK_DIR", "/a/" + "b" * 256, "'/a/bbb", "longer than 255 bytes"),
    ("SLURM_JOB_USER", "john doe", "'john doe'", "contains ' '"),
    ("SLURM_JOB_USER", "a:b", "'a:b'", "contains ':'"),
    ("SLURM_JOB_USER", "../root", "'../root'", "contains '/'"),
    ("SLURM_JOB_USER", "-rf", "'-rf'", "starts with '-'"),
    ("SLURM_JOB_USER", "x" * 33, "'xxxxx", "longer than 32 bytes"),
    ("SLURM_JOB_USER", "alice\n", "'alice\\n'", "control character"),
    ("SLURM_JOB_USER", "al\udcffce", "'al\\udcffce'", "not valid UTF-8"),
    ("SLURM_JOB_USER", "12345", "'12345'", "all digits"),
    ("SLURM_JOB_USER", "x" * KIB10, "'xxxx", "longer than 32 bytes"),
    # valid alone, not together: the name is not the uid's
    ("SLURM_JOB_USER", "root", "'root'", "is not the name of SLURM_JOB_UID 65534"),
    ("SLURM_JOB_USER", "<script>&'\"$(x)`x`;", "'<script>&", "is not the name of SLURM_JOB_UID"),
    ("SLURM_JOB_UID", "-1", "'-1'", "negative"),
    ("SLURM_JOB_UID", "+65534", "'+65534'", "not a plain decimal number"),
    ("SLURM_JOB_UID", " 65534", "' 65534'", "not a plain decimal number"),
    ("SLURM_JOB_UID", "65_534", "'65_534'", "not a plain decimal number"),
    ("SLURM_JOB_UID", "0x10", "'0x10'", "not a plain decimal number"),
    ("SLURM_JOB_UID", "1e3", "'1e3'", "not a plain decimal number"),
    ("SLURM_JOB_UID", "\u0666\u0665", "'\u0666\u0665'", "not a plain decimal number"),
    ("SLURM_JOB_UID", "9" * 30, "'999", "not a plain decimal number"),
    ("SLURM_JOB_UID", "4294967295", "'4294967295'", "out of range 0..4294967294"),
    ("SLURM_JOB_UID", "0", "'0'", "root's jobs get no VM"),
    ("SLURM_JOB_UID", "1", "'nobody'", "is not the name of SLURM_JOB_UID 1"),
    ("SLURM_JOB_UID", "4000000000", "'4000000000'", "no such user on this host"),
    ("SLURM_JOB_GID", "-5", "'-5'", "negative"),
    ("SLURM_JOB_GID", "4294967295", "'4294967295'", "out of range"),
    ("SLURM_JOB_GID", "0", "'0'", "jobs of group root get no VM"),
    ("SLURM_JOB_GID", "4000000000", "'4000000000'", "no such group on this host"),
    ("SLURM_JOB_GPUS", "0,0", "'0,0'", "GPU 0 is listed twice"),
    ("SLURM_JOB_GPUS", "0-4294967295", "'0-4294967295'", "not below 1024"),
    ("SLURM_JOB_GPUS", "1024", "'1024'", "not below 1024"),
    ("SLURM_JOB_GPUS", "0-99", "'0-99'", "more than 64 GPUs"),
    ("SLURM_JOB_GPUS", "-1", "'-1'", "negative index"),
    ("SLURM_JOB_GPUS", "0;reboot", "'0;reboot'", "is not an index"),
    ("SLURM_JOB_GPUS", "x", "'x'", "is not an index"),
    ("SLURM_JOB_GPUS", "1," * KIB10, "'1,1,", "longer than 512 characters"),
    ("SLURM_JOB_PARTITION", "bat ch", "'bat ch'", "not a partition name"),
    ("SLURM_JOB_PARTITION", "../x", "'../x'", "not a partition name"),
    ("SLURM_JOB_PARTITION", "<b>&amp;", "'<b>&amp;'", "not a partition name"),
    ("SLURM_JOB_PARTITION", "p" * 65, "'ppp", "not a partition name"),
    ("SLURM_JOB_PARTITION", "b\udcffatch", "'b\\udcffatch'", "not a partition name"),
    ("SLURM_JOB_COMMENT", "x" * 5000, "'xxxx", "longer than 4096 characters"),
    ("SLURM_JOB_COMMENT", "a\x00b", "'a\\x00b'", "contains NUL"),
]


@pytest.mark.parametrize("var,value,shown,why", SLURM_ENV,
                         ids=[f"{v}={x!r}"[:60] for v, x, _, _ in SLURM_ENV])
def test_a_bad_slurm_value_cancels_the_job_and_keeps_the_node(world, tmp_path, var, value, shown,
                                                              why):
    assert world.prolog(**{var: value}) == 0
    [line] = world.lines
    assert line.startswith("dgxvm prolog: job 42"), line
    assert "refused at" in line and shown in line and why in line, line
    assert line.endswith("job cancelled, node stays in service"), line
    assert len(line) < 1200                           # one readable line, not 10 KiB
    _nothing_but_the_refusal(world, tmp_path)


# -- the job comment -------------------------------------------------------------------------------
COMMENTS = [
    ("dgxvm:image=$(reboot)", "'$(reboot)'", "bad image name"),
    ("dgxvm:image=`reboot`", "'`reboot`'", "bad image name"),
    ("dgxvm:image=../etc", "'../etc'", "bad image name"),
    ("dgxvm:image=<x>&amp;", "'<x>&amp;'", "bad image name"),
    ("dgxvm:image=a;b", "'a;b'", "bad image name"),
    ("dgxvm:image=" + "a" * 1280, "'aaaa", "longer than 63 characters"),
    ("dgxvm:image=base\udcff", "'base\\udcff'", "bad image name"),
    ("dgxvm:image=other", "'other'", "is not offered in partition batch (offered: base;"),
    ("dgxvm:image=base,image=other", "image given twice", "('base', 'other')"),
    ("dgxvm:gpus=16", "'gpus'", "unknown key"),
    ("dgxvm:image", "'dgxvm:image'", "expected dgxvm:KEY=VALUE"),
]


@pytest.mark.parametrize("comment,shown,why", COMMENTS, ids=[c[:40] for c, _, _ in COMMENTS])
def test_a_bad_comment_cancels_the_job_and_keeps_the_node(world, tmp_path, comment, shown, why):
    assert world.prolog(SLURM_JOB_COMMENT=comment) == 0
    [line] = world.lines
    assert "refused at reading the request" in line and shown in line and why in line, line
    assert line.endswith("job cancelled, node stays in service")
    _nothing_but_the_refusal(world, tmp_path)


def test_a_job_without_gpus_is_not_checked_or_cancelled(world):
    """dgxvm has nothing to do with it: its work dir is none of our business."""
    assert world.prolog(SLURM_JOB_GPUS="", SLURM_JOB_WORK_DIR="/tmp/a\nb") == 0
    assert world.lines == ["dgxvm prolog: job 42: no GPUs asked for, no VM"]
    assert world.calls() == []


@pytest.mark.parametrize("job_id", ["", "0", "-1", "4x", "9" * 30, "2147483648"])
def test_without_a_job_id_there_is_no_job_to_refuse(world, job_id):
    """Not run by slurmd for a job: the node's problem (as before); the line names the value."""
    assert world.prolog(SLURM_JOB_ID=job_id) == 1
    assert "exit 1 drains the node" in world.lines[-1]
    assert (repr(job_id) if job_id else "SLURM_JOB_ID is not set") in world.lines[-1]
    assert world.calls() == []


def test_the_epilog_cleans_up_whatever_the_prolog_refused(world, tmp_path):
    assert world.epilog(SLURM_JOB_WORK_DIR="/tmp/a\nb", SLURM_JOB_USER="x y") == 0
    assert world.lines == [] and world.calls() == []


# -- legitimate values pass ------------------------------------------------------------------------
LEGIT_DIRS = ["/tmp/a b", "/home/x/été", "/w/it's $HOME; `x` $(y) <&> \"q\" * 100%", "/",
              "/tmp/ trailing ", "/" + "d" * 255]


@pytest.mark.parametrize("workdir", LEGIT_DIRS)
def test_legitimate_work_dirs_pass(image_store, workdir):  # noqa: F811
    from slurm_dgxvm.images import ImageStore
    env = {**ENV, "SLURM_JOB_WORK_DIR": workdir}
    job = SlurmJob.from_environ(env).on_this_host()
    req = create_request(config_mod.from_dict({}), job, ImageStore(image_store))
    assert req.workdir == workdir and (req.user, req.uid) == ("nobody", NOBODY.pw_uid)


@pytest.mark.parametrize("name", ["john.doe", "Alice", "u2", "_svc", "o'brien", "x" * 32,
                                  "jérôme", "build$"])
def test_legitimate_user_names_pass(name):
    assert account_name_problem(name) is None


def test_the_users_groups_come_from_the_host():
    job = SlurmJob.from_environ(ENV).on_this_host()
    assert job.home == NOBODY.pw_dir
    assert job.groups == tuple(sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid))
                                      - {NOBODY.pw_gid, 0}))
    assert all(grp.getgrgid(g) for g in job.groups)


def test_every_refusal_is_the_jobs_fault():
    for var, value, _, _ in SLURM_ENV:
        env = {**ENV, var: value}
        with pytest.raises(JobInputError) as exc:
            SlurmJob.from_environ(env).on_this_host()
        assert is_job_fault(exc.value) and not isinstance(exc.value, NotAJob)


def test_path_rule_edges():
    assert path_problem("/") is None
    assert path_problem("/" + "a/" * 2046 + "bc") is None         # 4095 bytes
    assert path_problem("/" + "a/" * 2046 + "bcd") == "longer than 4095 bytes"
    assert path_problem("/é" * 2047) == "longer than 4095 bytes"  # bytes, not characters


# -- the CLI ---------------------------------------------------------------------------------------
PLAN = [
    (["--gpu-count", "-1"], "-1", "not in the range"),
    (["--gpu-count", "1e3"], "'1e3'", "not a valid integer"),
    (["--gpu-count", "0x10"], "'0x10'", "not a valid integer"),
    (["--gpu-count", "9" * 30], "9" * 30, "GPU"),
    (["--gpu-count", "1", "--memory", "-5G"], "'-5G'", "not a size"),
    (["--gpu-count", "1", "--memory", "1e3"], "'1e3'", "not a size"),
    (["--gpu-count", "1", "--memory", "0x10"], "'0x10'", "not a size"),
    (["--gpu-count", "1", "--memory", "9" * 30 + "T"], "'" + "9" * 30 + "T'", "larger than 1P"),
    (["--gpu-count", "1", "--memory", "2000T"], "'2000T'", "larger than 1P"),
    (["--gpu-count", "1", "--disk-size", "10Q"], "'10Q'", "not a size"),
    (["--gpu-count", "1", "--vcpus", "-4"], "-4", "not in the range"),
    (["--gpu-count", "1", "--slurm-gpus", "0;reboot"], "'0;reboot'", "not an index"),
]


@pytest.mark.parametrize("args,shown,why", PLAN, ids=[" ".join(a)[:50] for a, _, _ in PLAN])
def test_bad_plan_options_exit_2_naming_the_value(tree, tmp_path, capsys, args, shown, why):
    state = tmp_path / "state"
    rc = main(["--sysfs-root", str(tree), "--state-dir", str(state), "plan", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("dgxvm: error: ") and shown in err and why in err, err
    assert not state.exists()


@pytest.fixture
def cli_config(tmp_path, trees, image_store):  # noqa: F811
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text(f'[host]\nsysfs_root = "{trees["dgx2"]}"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[libvirt]\nuri = "test:///default"\n[images]\nstore = "{image_store}"\n')
    return cfg


def _bad_dirs(tmp_path):
    nl = tmp_path / "a\nb"
    nl.mkdir()
    raw = os.path.join(os.fsencode(tmp_path), b"\xff\xfe")
    os.mkdir(raw)
    return {"newline": (str(nl), "'" + str(tmp_path) + "/a\\nb'", "control character"),
            "non-utf8": (os.fsdecode(raw), "\\udcff\\udcfe", "not valid UTF-8"),
            "missing": (str(tmp_path / "nope"), "nope", "does not exist")}


CREATE = [
    (["--domain", "<x>"], "'<x>'", "bad domain name"),
    (["--domain", "a&b"], "'a&b'", "bad domain name"),
    (["--domain", "it's"], "\"it's\"", "bad domain name"),
    (["--domain", 'a"b'], "'a\"b'", "bad domain name"),
    (["--domain", "$(x)"], "'$(x)'", "bad domain name"),
    (["--domain", "`x`"], "'`x`'", "bad domain name"),
    (["--domain", "a;b"], "'a;b'", "bad domain name"),
    (["--domain", "../x"], "'../x'", "bad domain name"),
    (["--domain", "a..b"], "'a..b'", "'..' is not allowed"),
    (["--domain", "d" * KIB10], "longer than 63 characters", "bad domain name"),
    (["--domain", "a\nb"], "'a\\nb'", "bad domain name"),
    (["--domain", "x\udcff"], "'x\\udcff'", "bad domain name"),
    (["--domain", "ok", "--image", "../etc"], "'../etc'", "bad image name"),
    (["--domain", "ok", "--image", "$(x)"], "'$(x)'", "bad image name"),
    (["--domain", "ok", "--user", "no such user"], "'no such user'", "no user"),
    (["--domain", "ok", "--user", "-1"], "'-1'", "no user"),
]


@pytest.mark.parametrize("args,shown,why", CREATE, ids=[" ".join(a)[:50] for a, _, _ in CREATE])
def test_bad_create_options_exit_2_and_take_nothing(cli_config, tmp_path, capsys, args, shown,
                                                    why):
    rc = main(["--config", str(cli_config), "create", "--gpu-count", "1", "--user", "nobody",
               *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("dgxvm: error: ") and shown in err and why in err, err
    assert len(err) < 1200
    assert not (tmp_path / "state" / "ledger.json").exists()
    assert not (tmp_path / "state" / "vms").exists() or \
        not any((tmp_path / "state" / "vms").iterdir())


@pytest.mark.parametrize("case", ["newline", "non-utf8", "missing"])
def test_a_workdir_no_guest_can_carry_is_refused_by_create(cli_config, tmp_path, capsys, case):
    path, shown, why = _bad_dirs(tmp_path)[case]
    rc = main(["--config", str(cli_config), "create", "--gpu-count", "1", "--domain", "ok",
               "--user", "nobody", "--workdir", path])
    err = capsys.readouterr().err
    assert rc == 2 and shown in err and why in err, err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("name", ["<x>", "../x", "a;b", "x" * KIB10, "a\x00b"])
def test_bad_domain_names_for_delete_exit_2(cli_config, tmp_path, capsys, name):
    rc = main(["--config", str(cli_config), "delete", "--domain", name])
    err = capsys.readouterr().err
    assert rc == 2 and "bad domain name" in err, err
    assert not (tmp_path / "state" / "ledger.json").exists()


# -- config files ----------------------------------------------------------------------------------
CONFIGS = [
    (b"[placement]\nalignmnet = \"prefer\"\n", "unknown key placement.alignmnet"),
    (b"[bogus]\nx = 1\n", "unknown section [bogus]"),
    (b"[vm]\nshare = 5\n", "vm.share must be str, not 5"),
    (b"[vm]\nshare = \"nfs\"\n", "vm.share 'nfs' is not one of"),
    (b"[vm]\ndata_disk_gib = -1\n", "vm.data_disk_gib is out of range: -1"),
    (b"[vm]\ndata_disk_gib = 99999999999999999999999\n", "vm.data_disk_gib 99999999999999999999999 "
                                                          "is out of range"),
    (b"[libvirt]\nready_timeout_s = 1e400\n", "libvirt.ready_timeout_s inf is out of range"),
    (b"[libvirt]\nready_timeout_s = nan\n", "libvirt.ready_timeout_s nan is out of range"),
    (b"[libvirt]\nready_timeout_s = true\n", "libvirt.ready_timeout_s must be float, not True"),
    (b"[vm]\nshare = \"\xff\"\n", "not valid UTF-8"),
    (b"[vm]\nshare = \"a\x00\"\n", "not valid TOML"),
    (b"[partitions.\"a b\"]\n", "partition name 'a b' is not a Slurm partition name"),
    (b"[partitions.x]\nimages = [\"../etc\"]\n", "bad image name '../etc'"),
    (b"[partitions.x]\nimages = \"base\"\n", "partitions.x.images must be a list of strings"),
    (b"[partitions.x]\nvcpus_per_gpu = -1\n", "partitions.x.vcpus_per_gpu must be >= 0"),
    (b"[vm]\nshare = \"9p\"\n", "vm.share \"9p\" is not offered"),
    (b"[vm]\nshare_refused = \"ignore\"\n", "vm.share_refused 'ignore' is not one of"),
    (b"[vm]\nshare_roots = [\"home\"]\n", "vm.share_roots: 'home': not an absolute path"),
    (b"[vm]\nshare_roots = [\"/home/../etc\"]\n", "vm.share_roots: '/home/../etc'"),
    (b"[vm]\nshare_roots = [\"/home\\n\"]\n", "vm.share_roots: '/home\\n': control character"),
    (b"[vm]\nshare_roots = \"/home\"\n", "vm.share_roots must be a list of strings"),
    (b"[vm]\nvirtiofsd = \"virtiofsd\"\n", "vm.virtiofsd 'virtiofsd' must be an absolute path"),
    (b"[slurm]\ndomain_prefix = \"<x>\"\n", "slurm.domain_prefix '<x>'"),
    (b"[slurm]\ndomain_prefix = \"" + b"j" * KIB10 + b"\"\n", "(at most 21)"),
]


@pytest.mark.parametrize("text,says", CONFIGS, ids=[t[:40].decode("latin-1") for t, _ in CONFIGS])
def test_a_bad_config_exits_2_naming_the_file_and_key(tree, tmp_path, capsys, text, says):
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_bytes(text)
    state = tmp_path / "state"
    rc = main(["--config", str(cfg), "--sysfs-root", str(tree), "--state-dir", str(state),
               "plan", "--gpu-count", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(cfg) in err and says in err, err
    assert not state.exists()


def test_a_bad_config_drains_with_one_line_in_the_prolog(tmp_path, monkeypatch, capsys):
    """A config is the admin's, not the job's: exit 1 is right, and the line says why."""
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_bytes(b"[vm]\nshare = \"\xff\"\n")
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DGXVM_CONFIG", str(cfg))
    assert main(["prolog"]) == 1
    err = capsys.readouterr().err
    assert "failed at reading the config" in err and "not valid UTF-8" in err
