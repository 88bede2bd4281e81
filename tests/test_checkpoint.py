"""Checkpoints and the output directory, in process on a small torch model (no trainer run):
checksums and the damaged-file errors, resume fallback, non-finite weights refused, a full disk
mid-save, pruning, metrics truncation on resume, and the output-dir checks made before loading."""
import errno
import io
import json
import os
import pathlib

import pytest
import torch

from treepo.train import checkpoint as ckpt
from treepo.train.config import TrainConfig
from treepo.train.metrics import MetricsLog
from treepo.train.run_dir import RUN_ENTRIES, clear_previous_run, plan_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP without a process group warns


def _model():
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    return m, opt


def _saved(tmp_path, steps=(1, 2, 3), keep=0):
    m, opt = _model()
    root = str(tmp_path / "checkpoints")
    for s in steps:
        ckpt.save_checkpoint(root, s, m, opt, {"data": s}, keep=keep)
    return root, m, opt


def _shard(path):
    return os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0])


def _flip(path, at=200, n=60):
    b = bytearray(open(path, "rb").read())
    for i in range(at, min(at + n, len(b))):
        b[i] ^= 0xFF
    open(path, "wb").write(bytes(b))


def _listing(root):
    return sorted(os.listdir(root)), open(os.path.join(root, "latest")).read()


def test_completion_mark_records_every_file_and_verify_names_a_changed_one(tmp_path):
    root, _, _ = _saved(tmp_path)
    path = os.path.join(root, "step_000003")
    meta = json.load(open(os.path.join(path, ckpt.META)))
    assert set(meta["files"]) == set(os.listdir(path)) - {ckpt.META}  # .metadata, shards, rng
    assert ckpt.verify_checkpoint(path)["step"] == 3
    shard = _shard(path)
    _flip(shard)
    with pytest.raises(ValueError, match=f"corrupted checkpoint file {shard}: its sha256"):
        ckpt.verify_checkpoint(path)
    with open(shard, "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=f"{shard}: .* bytes"):
        ckpt.verify_checkpoint(path)
    path = os.path.join(root, "step_000002")
    os.remove(os.path.join(path, "rng_rank0.pt"))
    with pytest.raises(ValueError, match="step_000002/rng_rank0.pt is missing"):
        ckpt.verify_checkpoint(path)
    path = os.path.join(root, "step_000001")
    open(os.path.join(path, ckpt.META), "w").write('{"step": 1, "fi')  # a mark cut short
    with pytest.raises(ValueError, match=f"{os.path.join(path, ckpt.META)} is corrupted: not valid JSON"):
        ckpt.verify_checkpoint(path)


def test_resume_refuses_a_damaged_checkpoint_unless_asked_to_fall_back(tmp_path):
    root, _, _ = _saved(tmp_path)
    _flip(_shard(os.path.join(root, "step_000003")))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ckpt.resume_checkpoint(str(tmp_path / "elsewhere"), fallback=True)
    with pytest.raises(ValueError, match="step_000003/__0_0.distcp.*--resume_fallback true"):
        ckpt.resume_checkpoint(root)
    path, skipped = ckpt.resume_checkpoint(root, fallback=True)
    assert path == os.path.join(root, "step_000002")
    assert len(skipped) == 1 and "step_000003" in skipped[0] and "sha256" in skipped[0]
    for s in (1, 2):
        _flip(_shard(os.path.join(root, f"step_{s:06d}")))
    with pytest.raises(ValueError, match="no intact checkpoint"):
        ckpt.resume_checkpoint(root, fallback=True)


def test_damaged_shard_loads_as_one_value_error_not_a_checkpoint_exception(tmp_path):
    root, m, opt = _saved(tmp_path, steps=(1,))
    path = os.path.join(root, "step_000001")
    _flip(_shard(path))
    with pytest.raises(ValueError, match=f"checkpoint {path} could not be loaded") as e:
        ckpt.load_checkpoint(path, m, opt)  # DCP's CheckpointException is a BaseException
    assert "\n" not in str(e.value)


def test_non_finite_weights_are_neither_saved_nor_exported(tmp_path):
    root, m, opt = _saved(tmp_path, steps=(1,))
    before = _listing(root)
    with torch.no_grad():
        m[1].weight[0, 3] = float("nan")
        m[1].bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to save.*model\.1\.bias \(1 values\), model\.1\.weight"):
        ckpt.save_checkpoint(root, 2, m, opt, {})
    assert _listing(root) == before
    out = str(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"refusing to export HF weights.*1\.weight"):
        ckpt.export_hf(m, out, {})
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def _disk_full_after(monkeypatch, suffix):
    """Writes to files ending in suffix fail as on a full disk."""
    class Full(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = pathlib.Path.open

    def fake_open(self, mode="r", *a, **k):
        if "w" in mode and str(self).endswith(suffix):
            return io.BufferedWriter(Full(str(self), "w"))
        return real(self, mode, *a, **k)

    monkeypatch.setattr(pathlib.Path, "open", fake_open)


def test_disk_full_mid_save_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root, m, opt = _saved(tmp_path, steps=(1,))
    before = _listing(root)
    _disk_full_after(monkeypatch, ".distcp")
    with pytest.raises(OSError, match=r"step_000002 not saved: no space left on device: .*step_000002\.tmp "
                                      r"\(step_000001 and `latest` are unchanged\)"):
        ckpt.save_checkpoint(root, 2, m, opt, {})
    assert _listing(root) == before  # no partial step_000002.tmp left behind
    ckpt.verify_checkpoint(os.path.join(root, "step_000001"))
    # torch.save's zip writer reports a full disk as a RuntimeError without errno: the free space tells
    monkeypatch.undo()
    monkeypatch.setattr(ckpt.dcp, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError, match="no space left on device: .*step_000002.tmp"):
        ckpt.save_checkpoint(root, 2, m, opt, {})
    assert _listing(root) == before


def test_pruning_keeps_the_newest_and_latest_and_removes_stale_tmp_dirs(tmp_path):
    root, m, opt = _saved(tmp_path, steps=(1, 2))
    os.makedirs(os.path.join(root, "step_000007.tmp"))  # a save that crashed
    for s in (3, 4, 5):
        ckpt.save_checkpoint(root, s, m, opt, {}, keep=2)
    assert _listing(root) == (["latest", "step_000004", "step_000005"], "step_000005")
    open(os.path.join(root, "latest"), "w").write("step_000004")
    assert ckpt.prune_checkpoints(root, 1) == []  # the newest complete one and `latest` are both kept
    ckpt.save_checkpoint(root, 6, m, opt, {}, keep=0)  # 0 keeps all
    assert sorted(os.listdir(root)) == ["latest", "step_000004", "step_000005", "step_000006"]


def test_metrics_truncate_to_the_resumed_step(tmp_path):
    log = MetricsLog(str(tmp_path), 0)
    for s in range(5):
        log.write({"step": s, "x": s})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "x"')  # a record cut short by a crash
    assert log.truncate(2) == 3
    assert [json.loads(line)["step"] for line in open(log.path)] == [0, 1, 2]
    assert not os.path.exists(log.path + ".tmp")


def _cfg(out, **kw):
    return TrainConfig(output_dir=str(out), **kw)


def test_an_output_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    assert plan_run(_cfg(out)).previous == []  # fresh: created
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"--output_dir {out} holds another run \\(config.json, metrics.jsonl\\); "
                                         "pass --resume true.*--overwrite true"):
        plan_run(_cfg(out))
    with pytest.raises(ValueError, match="--resume true: no complete checkpoint in .*checkpoints"):
        plan_run(_cfg(out, resume=True))
    assert plan_run(_cfg(out, overwrite=True)).previous == ["config.json", "metrics.jsonl"]
    for e in RUN_ENTRIES:
        if not os.path.exists(out / e):
            (out / e).mkdir()
    assert clear_previous_run(str(out)) == list(RUN_ENTRIES)
    assert os.listdir(out) == ["notes.txt"]


def test_resume_plan_verifies_the_checkpoint(tmp_path):
    root, _, _ = _saved(tmp_path, steps=(1, 2))
    assert plan_run(_cfg(tmp_path, resume=True)).resume_from == os.path.join(root, "step_000002")
    _flip(_shard(os.path.join(root, "step_000002")))
    with pytest.raises(ValueError, match="corrupted checkpoint file"):
        plan_run(_cfg(tmp_path, resume=True))
    plan = plan_run(_cfg(tmp_path, resume=True, resume_fallback=True))
    assert plan.resume_from == os.path.join(root, "step_000001") and len(plan.skipped) == 1


def test_an_unwritable_output_dir_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"--output_dir {tmp_path}/file/run is not writable"):
        plan_run(_cfg(tmp_path / "file" / "run"))
    with pytest.raises(ValueError, match="is a file, not a directory"):
        plan_run(_cfg(tmp_path / "file"))


@pytest.mark.parametrize("kw,msg", [(dict(resume=True, overwrite=True), "give one"),
                                    (dict(resume_fallback=True), "only applies with resume"),
                                    (dict(keep_checkpoints=-1), "keep_checkpoints=-1"),
                                    (dict(keep_checkpoints=1.5), "keep_checkpoints=1.5"),
                                    (dict(resume="maybe"), "resume='maybe' must be true or false"),
                                    (dict(lr=float("inf")), "lr=inf")])
def test_run_flags_are_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)
