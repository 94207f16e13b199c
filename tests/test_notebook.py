"""The Colab notebook of the miniature recipe (``launch/colab/retro_jax_miniature.ipynb``)
executed headless, so that it cannot rot as the recipe's API changes.

The notebook runs in a kernel of this interpreter (a kernelspec installed into a
temporary directory, so no Jupyter installation is needed), from the repository root,
with its ``parameters`` cell replaced by the smallest setting of ``tests/recipe_fixture.py``
(a tenth of the corpus, 4 steps per training stage, 20 QA questions) and ``RUN_DIR`` set
to a copy of the session's finished run of that setting (``miniature_run``, shared with
tests/test_recipe.py): the recipe cell skips every finished step and rewrites the report,
and the cells after it read, display and generate from that run. Its Colab setup cell
does nothing outside Colab but find the repository root.
"""

import json
import os
import shutil

import pytest

import recipe_fixture

pytestmark = pytest.mark.slow  # see pytest.ini

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab", "retro_jax_miniature.ipynb")
KERNEL = "retro_jax_test"


def outputs_text(notebook):
  """Everything the cells displayed or printed, as one string."""
  parts = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream":
        parts.append(output["text"])
      for mime in ("text/plain", "text/markdown"):
        value = output.get("data", {}).get(mime)
        if value:
          parts.append(value if isinstance(value, str) else "".join(value))
  return "\n".join(parts)


def test_committed_notebook_has_no_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]
  tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "expected exactly one cell tagged 'parameters'"


@pytest.fixture(scope="module")
def executed(tmp_path_factory, miniature_run):
  tmp = tmp_path_factory.mktemp("notebook")
  run_dir = tmp / "run"
  shutil.copytree(miniature_run[0], run_dir)   # keeps mtimes: as done as the run
  # A kernelspec for this interpreter (its argv is sys.executable).
  kernelspec.install(kernel_name=KERNEL, prefix=str(tmp / "jupyter"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in notebook.cells:
    if "parameters" in cell.metadata.get("tags", []):
      cell.source = recipe_fixture.notebook_parameters(run_dir)
  env = dict(os.environ, JUPYTER_PATH=str(tmp / "jupyter" / "share" / "jupyter"),
             XLA_FLAGS=recipe_fixture.XLA_FLAGS,
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  old_path = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # where the kernelspec is looked up
  try:
    client = nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=600,
                                     resources={"metadata": {"path": REPO}})
    client.execute(env=env)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"the notebook failed:\n{str(e)[-6000:]}")
  finally:
    if old_path is None:
      os.environ.pop("JUPYTER_PATH", None)
    else:
      os.environ["JUPYTER_PATH"] = old_path
  return notebook, run_dir


def test_notebook_runs_the_recipe(executed):
  notebook, run_dir = executed
  report = (run_dir / "report.md").read_text(encoding="utf-8")
  headline = report.splitlines()[0]
  assert headline == "# InstructRetro in miniature"
  for plot in ("loss_pretraining.png", "loss_sft.png", "perplexity.png"):
    with open(run_dir / "plots" / plot, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", plot
  with open(run_dir / "eval" / "qa.json", encoding="utf-8") as f:
    qa = json.load(f)
  assert {r["model"] for r in qa} == {"GPT-Instruct", "InstructRetro"}
  assert all(r["count"] == 20 for r in qa)

  text = outputs_text(notebook)
  # The run was finished: the recipe cell re-ran only the report.
  assert "[recipe] report: running" in text and "[recipe] gpt: done (skipped)" in text
  assert headline in text and "## Zero-shot QA" in text   # the report, displayed
  images = [o for c in notebook.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == len(list((run_dir / "plots").glob("*.png")))
  assert "InstructRetro_retrieval_predictions.jsonl" in text
  # The generation cell: a greedy answer of the instruction-tuned Retro, which read
  # the neighbors it retrieved.
  lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
           for line in text.splitlines()
           if line.startswith(("Question:", "Generated:", "Answer:"))}
  assert set(lines) == {"Question", "Generated", "Answer"}, text[-3000:]
  generated = json.loads(lines["Generated"])
  assert isinstance(generated, str) and generated.strip()
  assert "(prompt)" in text and "<- doc" in text    # format_record's retrieval lines
