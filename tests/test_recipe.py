"""The miniature InstructRetro recipe (``python -m retro_jax.recipe``) end to end.

One run at the smallest scale (a tenth of the embedded corpus, 4 steps per training
stage) through the command line, as a user runs it (``miniature_run`` in conftest.py,
shared with tests/test_notebook.py); then what it wrote is checked:
every step recorded, the three perplexity modes on identical tokens, the QA table,
the knowledge update re-embedding only changed chunks and retrieving the new facts,
and a re-run of a copy skipping every finished step; a copy with its chunk DB deleted
re-runs the retrieval step and marks what follows as stale.

The fast tests run the driver (``recipe.Recipe``) with the expensive work replaced by
fakes that write small files where the real steps write theirs (the corpus generator,
the preprocessing pipeline, training; the evaluation steps and the report as a whole):
a step whose output is deleted, emptied or edited re-runs, and so does every step
downstream of it (``STEP_INPUTS``), and no other.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import recipe_fixture
from recipe_fixture import run_recipe

REPO = recipe_fixture.REPO


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow   # see pytest.ini
def test_every_step_runs_and_is_recorded(miniature_run):
  from retro_jax.recipe import STEPS   # pylint: disable=g-import-not-at-top
  run_dir, proc = miniature_run
  with open(run_dir / "manifest.json", encoding="utf-8") as f:
    manifest = json.load(f)
  done = manifest["done"] if "done" in manifest else manifest
  for step in STEPS:
    assert f"[recipe] {step}: finished" in proc.stdout, step
    assert step in json.dumps(done), step
  for model in ("gpt", "retro", "gptfit", "instructretro", "gpt_instruct"):
    assert os.listdir(run_dir / "models" / model / "checkpoints"), model
  report = (run_dir / "report.md").read_text(encoding="utf-8")
  for heading in ("## Held-out perplexity", "## RETRO's analyses",
                  "### Neighbors at evaluation", "### Leakage", "### Retrieval DB size",
                  "## Zero-shot QA", "## Knowledge update", "## Time per step"):
    assert heading in report
  assert "bits/byte" in report
  assert "\nCode: retro_jax " in report          # the code that ran the steps
  for plot in ("neighbors.png", "leakage.png", "db_size.png"):   # linked from the report
    assert f"](eval/analyses/{plot})" in report
    with open(run_dir / "eval" / "analyses" / plot, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", plot
  for plot in ("loss_pretraining.png", "loss_sft.png", "perplexity.png"):
    with open(run_dir / "plots" / plot, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", plot


@pytest.mark.slow   # see pytest.ini
def test_perplexity_modes_score_identical_tokens(miniature_run):
  run_dir, _ = miniature_run
  with open(run_dir / "eval" / "perplexity.json", encoding="utf-8") as f:
    rows = json.load(f)
  modes = {(r["model"], r["mode"]) for r in rows}
  assert modes == {("Retro", "retrieval"), ("Retro", "encoder ablated"),
                   ("GPT-fit", "decoder only")}
  assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] > 1000
  with open(run_dir / "eval" / "perplexity_by_class.json", encoding="utf-8") as f:
    by_class = json.load(f)
  values = ["fact values, first mention, first chunk",
            "fact values, first mention, later chunks", "fact values, repeated"]
  names = ["entity names, first mention", "entity names, repeated"]
  assert {r["class"] for r in by_class} == {*values, *names, "other"}
  for model, mode in modes:   # the value classes are disjoint; names may overlap values
    counts = {r["class"]: r["tokens"] for r in by_class
              if (r["model"], r["mode"]) == (model, mode)}
    classified = max(sum(counts[c] for c in values), sum(counts[c] for c in names))
    assert counts["other"] + classified <= rows[0]["tokens"] <= sum(counts.values())
    assert min(counts.values()) > 0


@pytest.mark.slow   # see pytest.ini
def test_qa_rows_and_prompts_with_retrieved_passages(miniature_run):
  run_dir, _ = miniature_run
  with open(run_dir / "eval" / "qa.json", encoding="utf-8") as f:
    rows = json.load(f)
  assert [(r["model"], r["mode"]) for r in rows] == [
      ("GPT-Instruct", "question only"), ("GPT-Instruct", "passages in prompt"),
      ("InstructRetro", "question only"), ("InstructRetro", "passages, encoder ablated"),
      ("InstructRetro", "retrieval")]
  assert all(r["count"] == 20 and 0 <= r["exact_match"] <= 1 for r in rows)
  # Paired: each InstructRetro mode against GPT-Instruct with as many passages.
  manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
  paired = manifest["done"]["eval_qa"]["info"]["paired"]
  assert [(p["InstructRetro"], p["GPT-Instruct"]) for p in paired] == [
      ("question only", "question only"), ("passages, encoder ablated", "passages in prompt"),
      ("retrieval", "passages in prompt")]
  by_mode = {(r["model"], r["mode"]): r["exact_match"] * 20 for r in rows}
  for p in paired:
    assert p["count"] == 20 and 0 < p["p_value"] <= 1
    assert p["retro_only"] + p["both"] == round(by_mode["InstructRetro", p["InstructRetro"]])
    assert p["gpt_only"] + p["both"] == round(by_mode["GPT-Instruct", p["GPT-Instruct"]])
  assert "only InstructRetro right" in (run_dir / "report.md").read_text(encoding="utf-8")
  questions = read_jsonl(run_dir / "eval" / "qa_questions_ctxs.jsonl")
  assert len(questions) == 20 and all(len(q["ctxs"]) == 2 for q in questions)
  # The SFT data renders as the evaluation prompt: chat records with passages.
  sft = read_jsonl(run_dir / "sft" / "qa_with_passages.jsonl")
  assert sft and all(len(r["passages"]) == 2 for r in sft)
  assert sft[0]["messages"][-1]["content"].startswith("The answer is ")


@pytest.mark.slow   # see pytest.ini
def test_knowledge_update_reembeds_only_changed_chunks_and_retrieves_new_facts(miniature_run):
  run_dir, _ = miniature_run
  with open(run_dir / "eval" / "knowledge_update" / "knowledge_update.json",
            encoding="utf-8") as f:
    info = json.load(f)
  assert 0 < info["embedded_anew"] < 0.2 * info["chunk_texts"]
  updates = read_jsonl(run_dir / "corpus" / "updates.jsonl")
  assert info["facts"] == len(updates) > 0
  before = read_jsonl(run_dir / "eval" / "knowledge_update" / "questions_original.jsonl")
  after = read_jsonl(run_dir / "eval" / "knowledge_update" / "questions_updated.jsonl")

  def shows(rows, key):
    return sum(any(u[key] in c["text"] for c in r["ctxs"]) for r, u in zip(rows, updates))

  assert shows(after, "new") >= 0.5 * len(updates)   # the new facts are retrieved ...
  assert shows(after, "old") == 0                     # ... and the old ones are gone
  assert shows(before, "new") < shows(after, "new")
  completions = read_jsonl(run_dir / "eval" / "knowledge_update" /
                          "completions_updated.jsonl")
  # Each prompt is its entity's held-out text cut just before the fact's old value.
  assert completions and all(c["old"] not in c["prompt"] for c in completions)
  assert set(info["completions"]) == {"original DB", "updated DB"}


@pytest.mark.slow   # see pytest.ini
def test_rerun_skips_finished_steps(miniature_run, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(miniature_run[0], run_dir)   # keeps mtimes: as done as the run
  proc = run_recipe(run_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count(": running") == 1 and "report: running" in proc.stdout
  assert proc.stdout.count("done (skipped)") >= 11
  # The corpus binding reached the generator (gin/miniature/corpus.gin) ...
  with open(run_dir / "corpus" / "manifest.json", encoding="utf-8") as f:
    assert json.load(f)["settings"]["update_fraction"] == 0.3
  # ... and a later step, run again in a fresh process, still parses it.
  with open(run_dir / "manifest.json", encoding="utf-8") as f:
    manifest = json.load(f)
  del manifest["done"]["eval_perplexity"]
  with open(run_dir / "manifest.json", "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  proc = run_recipe(run_dir, "--steps=eval_perplexity")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "eval_perplexity: finished" in proc.stdout


@pytest.mark.slow   # see pytest.ini
def test_user_corpus_split_and_errors(tmp_path):
  from retro_jax import recipe   # pylint: disable=g-import-not-at-top
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(40)))
  files = recipe.split_documents(str(docs), str(tmp_path / "c"), text_key="body")
  parts = {k: read_jsonl(files[k]) for k in ("pretrain", "retrofit", "heldout",
                                             "retrieval")}
  assert len(parts["pretrain"]) + len(parts["retrofit"]) + len(parts["heldout"]) == 40
  assert parts["retrieval"][:len(parts["retrofit"])] == parts["retrofit"]
  texts = lambda rows: {r["text"] for r in rows}   # pylint: disable=unnecessary-lambda-assignment
  assert not texts(parts["heldout"]) & texts(parts["retrieval"])
  assert files["sft_qa"] is None and files["qa_test"] is None
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
    recipe.split_documents(str(bad), str(tmp_path / "d"))
  with pytest.raises(ValueError, match="unknown steps"):
    recipe.Recipe(str(tmp_path / "r")).run(["corpus", "pretrain"])


@pytest.mark.usefixtures("clean_gin")   # the binding parsed here must not outlive it
def test_corpus_seed_and_scale_are_flags_not_gin_bindings(tmp_path):
  from retro_jax import recipe   # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"--gin.generate_corpus.seed: .*pass --seed= "):
    recipe.Recipe(str(tmp_path / "s"), overrides=["generate_corpus.seed = 1"]).run(["corpus"])
  assert not os.path.exists(tmp_path / "s" / "corpus" / "pretrain.jsonl")


@pytest.mark.slow   # see pytest.ini
def test_eval_command_lines_on_the_run(miniature_run, tmp_path):
  """``python -m retro_jax.eval`` with the shipped eval gin files, on the run's models."""
  run_dir, _ = miniature_run
  env = dict(os.environ, XLA_FLAGS=recipe_fixture.XLA_FLAGS)
  common = [sys.executable, "-m", "retro_jax.eval", "--gin_file=miniature/model.gin",
            f"--gin.RETRIEVAL_DIR={run_dir / 'retrieval'}", f"--gin.OUTPUT_DIR={tmp_path}"]
  ppl = subprocess.run(
      common[:3] + ["--gin_file=eval_ppl.gin"] + common[3:] + [
          "--gin.SEQ_LEN=256", f"--gin.CHECKPOINTS={{'Retro': '{run_dir}/models/retro', "
          f"'GPT-fit': '{run_dir}/models/gptfit'}}"],
      cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert ppl.returncode == 0, ppl.stderr[-3000:]
  with open(tmp_path / "perplexity.json", encoding="utf-8") as f:
    ours = {(r["model"], r["mode"]): r["loss"] for r in json.load(f)}
  with open(run_dir / "eval" / "perplexity.json", encoding="utf-8") as f:
    recipe = {(r["model"], r["mode"]): r["loss"] for r in json.load(f)}
  assert ours == pytest.approx(recipe, abs=1e-4)   # same models, same tokens, same table
  qa = subprocess.run(
      common[:3] + ["--gin_file=eval_qa.gin"] + common[3:] + [
          f"--gin.CHECKPOINT={run_dir}/models/instructretro", "--gin.MAX_EXAMPLES=3",
          f"--gin.QA_FILE={run_dir}/corpus/qa_test.jsonl", "--gin.MODEL_NAME=ir"],
      cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert qa.returncode == 0, qa.stderr[-3000:]
  assert "| ir | retrieval |" in qa.stdout.replace("  ", " ")
  rows = read_jsonl(tmp_path / "ir_retrieval_predictions.jsonl")
  assert len(rows) == 3 and all("prediction" in r for r in rows)
  # Each run of the output directory recorded its tasks and the code that ran them.
  from retro_jax.utils import provenance   # pylint: disable=g-import-not-at-top
  runs = read_jsonl(tmp_path / "provenance.jsonl")
  assert [r["tasks"] for r in runs] == [["perplexity"], ["qa"]]
  assert all(r["code"] == provenance.code_version() for r in runs)


@pytest.mark.slow   # see pytest.ini
def test_deleted_chunk_db_reruns_retrieval_and_what_follows(miniature_run, tmp_path):
  from retro_jax import recipe   # pylint: disable=g-import-not-at-top
  run_dir, _ = miniature_run
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)         # keeps mtimes: the copy is as done as the run
  shutil.rmtree(copy / "retrieval" / "retrieval_db")
  proc = run_recipe(copy, "--steps=corpus,retrieval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[recipe] corpus: done (skipped)" in proc.stdout
  assert "[recipe] retrieval: output retrieval/retrieval_db missing" in proc.stdout
  assert "[recipe] retrieval: finished" in proc.stdout
  assert os.listdir(copy / "retrieval" / "retrieval_db")
  # Everything built on the old DB is stale now; the corpus is not.
  rerun = recipe.Recipe(str(copy), scale=recipe_fixture.SCALE)
  assert rerun.why_rerun("corpus") is None and rerun.why_rerun("retrieval") is None
  assert rerun.why_rerun("gpt") == "input retrieval changed"
  assert rerun.why_rerun("sft_data") == "input retrieval changed"


# ----------------------------------------------------------------------------------
# The driver trusts the disk, not only its manifest (fast, with fake steps)
# ----------------------------------------------------------------------------------


@pytest.fixture
def fake_recipe(tmp_path, monkeypatch):
  """A function making a ``Recipe`` on ``tmp_path/run`` whose expensive work is faked;
  ``.log`` holds the lines it printed. The corpus is deterministic (a re-run writes
  the same bytes); every other fake writes new bytes (a new length) each time."""
  from retro_jax import recipe   # pylint: disable=g-import-not-at-top
  sizes = iter(range(1, 10**6))

  def write(path, text=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text if text is not None else json.dumps({"pad": "x" * next(sizes)}) + "\n")
    return path

  def generate_corpus(output_dir, scale, seed):
    del scale, seed
    for key in recipe.CORPUS_FILES:
      write(os.path.join(output_dir, f"{key}.jsonl"), json.dumps({"text": key}) + "\n")
    write(os.path.join(output_dir, "kb.json"), "{}")
    return {"counts": {}}

  def build_retrieval(files, output_dir):
    del files
    for part in ("vocab/spm.model", "retrieval_db/chunks.bin", "train_db/chunks.bin",
                 "index/index.faissindex", "neighbors/train/neighbors.bin", ".config.lock"):
      write(os.path.join(output_dir, part))
    write(os.path.join(output_dir, "retrieval.json"),
          json.dumps({"chunk_size": 64, "pad": "x" * next(sizes)}))
    return {"retrieval_db": "retrieval_db", "splits": {}, "index_factory": "Flat",
            "vocab_size": 8, "chunk_size": 64, "stages": []}

  def run_training(step, layout, bindings, overrides, gin_file=None):
    del bindings, overrides, gin_file
    write(os.path.join(layout.model_dir(step), "checkpoints", "4", "params"))
    return {"loss": 1.0}

  def fake_step(*paths):
    def step(self):
      return [write(self.layout.path(p)) for p in paths], {}
    return step

  monkeypatch.setattr(recipe, "_parse_step_gin", lambda *args: None)
  monkeypatch.setattr(recipe.encyclopedia, "generate_corpus", generate_corpus)
  monkeypatch.setattr(recipe, "build_retrieval", build_retrieval)
  monkeypatch.setattr(recipe, "run_training", run_training)
  monkeypatch.setattr(recipe, "build_sft_data",
                      lambda qa_file, retriever, output_path: write(output_path))
  monkeypatch.setattr(recipe.Recipe, "retriever", lambda self: None)
  monkeypatch.setattr(recipe.Recipe, "step_eval_perplexity", fake_step("eval/perplexity.json"))
  monkeypatch.setattr(recipe.Recipe, "step_eval_analyses",
                      fake_step("eval/analyses/analyses.json"))
  monkeypatch.setattr(recipe.Recipe, "step_eval_qa", fake_step("eval/qa.json"))
  monkeypatch.setattr(recipe.Recipe, "step_knowledge_update",
                      fake_step("eval/knowledge_update/knowledge_update.json"))
  monkeypatch.setattr(recipe.Recipe, "step_report", fake_step("report.md", "plots/loss.png"))

  def make(**kwargs):
    log = []
    made = recipe.Recipe(str(tmp_path / "run"), print_fn=log.append, **kwargs)
    made.log = log
    return made

  return make


def ran(log):
  return [line.split()[1].rstrip(":") for line in log if line.endswith(": running")]


ALL = ["corpus", "retrieval", "gpt", "retro", "gptfit", "sft_data", "instructretro",
       "gpt_instruct", "eval_perplexity", "eval_analyses", "eval_qa", "knowledge_update",
       "report"]


def finished_run(fake_recipe, tmp_path):
  first = fake_recipe()
  first.run()
  assert ran(first.log) == ALL
  return tmp_path / "run"


def test_clean_rerun_runs_only_the_report(fake_recipe, tmp_path):
  finished_run(fake_recipe, tmp_path)
  again = fake_recipe()
  again.run()
  assert ran(again.log) == ["report"]          # the report is always rewritten
  assert sum(line.endswith("done (skipped)") for line in again.log) == 12
  manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
  recorded = manifest["done"]["retro"]["fingerprints"]
  assert set(recorded["inputs"]) == {"retrieval", "gpt"}
  assert list(recorded["outputs"]) == ["models/retro/checkpoints"]
  assert "retrieval/retrieval_db" in manifest["done"]["retrieval"]["outputs"]


def test_every_step_records_the_code_it_ran(fake_recipe, tmp_path):
  from retro_jax.utils import provenance   # pylint: disable=g-import-not-at-top
  finished_run(fake_recipe, tmp_path)
  manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
  assert set(manifest["done"]) == set(ALL)
  for step, entry in manifest["done"].items():
    assert entry["info"]["code"] == provenance.code_version(), step


def test_arm_runs_after_gptfit_and_feeds_the_evaluation(fake_recipe, tmp_path):
  first = fake_recipe(arms=["retro_scratch"])
  first.run()
  assert ran(first.log) == ALL[:5] + ["retro_scratch"] + ALL[5:]
  shutil.rmtree(tmp_path / "run" / "models" / "retro_scratch")
  again = fake_recipe(arms=["retro_scratch"])
  again.run()
  assert ran(again.log) == ["retro_scratch", "eval_perplexity", "eval_analyses", "report"]
  assert "[recipe] eval_perplexity: input retro_scratch changed" in again.log
  with pytest.raises(ValueError, match="unknown arms"):
    fake_recipe(arms=["nope"])
  with pytest.raises(ValueError, match="added with --arms"):
    fake_recipe().run(["retro_scratch"])


def test_deleted_output_reruns_its_step_and_exactly_the_steps_downstream(
    fake_recipe, tmp_path):
  run = finished_run(fake_recipe, tmp_path)
  shutil.rmtree(run / "models" / "gptfit")
  again = fake_recipe()
  again.run()
  assert ran(again.log) == ["gptfit", "gpt_instruct", "eval_perplexity", "eval_analyses",
                            "eval_qa",
                            "report"]
  assert "[recipe] gptfit: output models/gptfit/checkpoints missing" in again.log
  assert "[recipe] gpt_instruct: input gptfit changed" in again.log
  assert "[recipe] eval_qa: input gpt_instruct changed" in again.log
  for step in ("corpus", "retrieval", "gpt", "retro", "sft_data", "instructretro",
               "knowledge_update"):
    assert f"[recipe] {step}: done (skipped)" in again.log, step
  # The retrieval DB deleted: every step but the corpus is built on it.
  shutil.rmtree(run / "retrieval" / "retrieval_db")
  third = fake_recipe()
  third.run()
  assert ran(third.log) == ALL[1:]
  assert "[recipe] retrieval: output retrieval/retrieval_db missing" in third.log
  assert "[recipe] gpt: input retrieval changed" in third.log


def test_emptied_output_directory_is_missing(fake_recipe, tmp_path):
  run = finished_run(fake_recipe, tmp_path)
  checkpoints = run / "models" / "retro" / "checkpoints"
  shutil.rmtree(checkpoints)
  (checkpoints / ".lock").parent.mkdir()
  (checkpoints / ".lock").write_text("")       # hidden files are not content
  again = fake_recipe()
  again.run()
  assert "[recipe] retro: output models/retro/checkpoints missing" in again.log
  assert ran(again.log) == ["retro", "instructretro", "eval_perplexity", "eval_analyses",
                            "eval_qa",
                            "knowledge_update", "report"]


def test_output_edited_by_hand_reruns_the_steps_downstream(fake_recipe, tmp_path):
  run = finished_run(fake_recipe, tmp_path)
  with open(run / "sft" / "qa_with_passages.jsonl", "a", encoding="utf-8") as f:
    f.write("edited by hand\n")
  again = fake_recipe()
  again.run()
  assert "[recipe] sft_data: output sft/qa_with_passages.jsonl changed" in again.log
  assert "[recipe] instructretro: input sft_data changed" in again.log
  assert ran(again.log) == ["sft_data", "instructretro", "gpt_instruct", "eval_qa",
                            "knowledge_update", "report"]
  # A step that re-runs to the same bytes (the corpus is deterministic) changes
  # nothing downstream.
  (run / "corpus" / "heldout.jsonl").write_text("edited\n")
  third = fake_recipe()
  third.run()
  assert "[recipe] corpus: output corpus/heldout.jsonl changed" in third.log
  assert ran(third.log) == ["corpus", "report"]
  # A file inside a directory output rewritten in place.
  params = run / "models" / "gpt" / "checkpoints" / "4" / "params"
  params.write_text(params.read_text() + "y")
  fourth = fake_recipe()
  fourth.run(["gpt", "retro"])
  assert "[recipe] gpt: output models/gpt/checkpoints changed" in fourth.log
  assert ran(fourth.log) == ["gpt", "retro"]
  assert fourth.why_rerun("gptfit") == "input gpt changed"


def test_tree_fingerprint_reads_listings_not_bytes(tmp_path):
  from retro_jax.utils import io   # pylint: disable=g-import-not-at-top
  tree = tmp_path / "tree"
  assert io.tree_fingerprint(tree) is None
  (tree / "sub").mkdir(parents=True)
  (tree / ".lock").write_text("")
  assert io.tree_fingerprint(tree) is None          # no file but a hidden one: empty
  (tree / "sub" / "a").write_text("1")
  assert io.tree_fingerprint(tree / "sub" / "a") == io.file_fingerprint(tree / "sub" / "a")
  before = io.tree_fingerprint(tree)
  assert before.startswith("tree:1:")
  (tree / ".tmp").write_text("debris")
  assert io.tree_fingerprint(tree) == before
  shutil.copytree(tree, tmp_path / "copy")            # a copy keeping mtimes is the same
  assert io.tree_fingerprint(tmp_path / "copy") == before
  (tree / "sub" / "a").write_text("22")
  assert io.tree_fingerprint(tree) != before


def test_entry_recorded_before_fingerprints_is_done_while_its_outputs_exist(
    fake_recipe, tmp_path):
  run = finished_run(fake_recipe, tmp_path)
  manifest = json.loads((run / "manifest.json").read_text())
  for entry in manifest["done"].values():
    del entry["fingerprints"]
  (run / "manifest.json").write_text(json.dumps(manifest))
  again = fake_recipe()
  again.run()
  assert ran(again.log) == ["report"]
  shutil.rmtree(run / "models" / "gpt" / "checkpoints" / "4")
  assert fake_recipe().why_rerun("gpt") == "output models/gpt/checkpoints missing"
