"""Atomic writes and manifests."""

import multiprocessing
import os
import stat

import pytest

from retro_jax.utils.io import Manifest, atomic_path, atomic_write_text


def test_atomic_path_renames_on_success_and_cleans_on_error(tmp_path):
  target = tmp_path / "out.txt"
  with pytest.raises(RuntimeError):
    with atomic_path(target) as tmp:
      with open(tmp, "w") as f:
        f.write("partial")
      raise RuntimeError("killed")
  assert not target.exists() and os.listdir(tmp_path) == []
  atomic_write_text(target, "done")
  assert target.read_text() == "done"
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask


def _mark(directory, unit):
  out = os.path.join(directory, f"{unit}.bin")
  with open(out, "w") as f:
    f.write(unit)
  Manifest(directory, {"k": 1}).mark_done(unit, [os.path.basename(out)])


def test_manifest_keeps_every_shard_marked_concurrently(tmp_path):
  Manifest(str(tmp_path), {"k": 1})
  ctx = multiprocessing.get_context("fork")
  procs = [ctx.Process(target=_mark, args=(str(tmp_path), f"shard{i}")) for i in range(8)]
  for p in procs:
    p.start()
  for p in procs:
    p.join()
  assert Manifest(str(tmp_path), {"k": 1}).done_units == sorted(f"shard{i}" for i in range(8))


def test_manifest_rejects_other_settings_and_missing_outputs(tmp_path):
  _mark(str(tmp_path), "a")
  with pytest.raises(ValueError, match="were made with settings"):
    Manifest(str(tmp_path), {"k": 2})
  os.remove(tmp_path / "a.bin")
  assert not Manifest(str(tmp_path), {"k": 1}).is_done("a")


def test_manifest_read_settings_names_the_file_and_the_stage(tmp_path):
  d = tmp_path / "built"
  with pytest.raises(FileNotFoundError, match=r"manifest\.json: no index build in .*built; run x"):
    Manifest.read_settings(d, stage="index", what="index", hint="; run x")
  m = Manifest(str(d), {"stage": "index", "n": 3})
  m.mark_done("a", [])
  assert Manifest.read_settings(d) == {"n": 3, "stage": "index"}
  assert Manifest.load(d, stage="index").is_done("a")
  with pytest.raises(ValueError, match=r"manifest\.json: not a chunk DB build \(stage 'index'\)"):
    Manifest.read_settings(d, stage="chunk_db", what="chunk DB")
  with pytest.raises(ValueError, match="not an embeddings build"):
    Manifest.load(d, stage="embeddings", what="embeddings")
  (d / "manifest.json").write_text('{"settings": ')
  with pytest.raises(ValueError, match=r"manifest\.json: corrupt manifest"):
    Manifest.read_settings(d)
  (d / "manifest.json").write_text('[1]')
  with pytest.raises(ValueError, match="no settings object"):
    Manifest.read_settings(d)


def test_read_jsonl_names_the_line_and_tolerates_only_a_torn_tail(tmp_path):
  from retro_jax.utils.io import read_jsonl
  path = tmp_path / "rows.jsonl"
  path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}', encoding="utf-8")
  assert [(w.rsplit(":", 1)[1], r) for w, r in read_jsonl(path)] == [
      ("1", {"a": 1}), ("3", {"a": 2}), ("4", {"a": 3})]
  path.write_text('{"a": 1}\n{"a": 2\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"rows.jsonl:2: invalid JSON"):
    list(read_jsonl(path))
  assert [r for _, r in read_jsonl(path, torn_tail=True)] == [{"a": 1}]
  path.write_text('{"a": \n{"a": 2}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"rows.jsonl:1: invalid JSON"):
    list(read_jsonl(path, torn_tail=True))
  path.write_text('[1, 2]\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"rows.jsonl:1: expected a JSON object, found list"):
    list(read_jsonl(path))
  path.write_bytes(b'{"a": "\xff"}\n')
  with pytest.raises(ValueError, match=r"rows.jsonl:1: not UTF-8"):
    list(read_jsonl(path))
