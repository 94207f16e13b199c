r"""XManager launcher: runs ``retro_jax.train`` on a GPU node or a TPU slice.

    xmanager launch launch/xmanager/launch.py -- \
        --gin_file=gin/recipes/retrofit.gin --model_dir=gs://bucket/runs/retrofit \
        --accelerator=tpu --tpu_topology=4x4 --gin.TRAIN_STEPS=10000

The job runs the same entry point as the Slurm script and the README; on a multi-host
TPU slice retro_jax.train calls jax.distributed.initialize() (JAX detects the TPU
environment). Requires the ``xmanager`` package on the launching machine only;
``--dry_run`` prints the job (entry point, arguments, requirements) as JSON instead of
launching it, without xmanager:

    python launch/xmanager/launch.py --dry_run --gin_file=gin/recipes/retrofit.gin \
        --model_dir=/tmp/run --gin.TRAIN_STEPS=10
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "gin files for retro_jax.train.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "MODEL_DIR (GCS or shared FS).",
                                 required=True)
_ACCELERATOR = flags.DEFINE_enum("accelerator", "gpu", ["gpu", "tpu"], "Accelerator kind.")
_GPU_TYPE = flags.DEFINE_string("gpu_type", "h100", "GPU type (gpu).")
_GPUS = flags.DEFINE_integer("gpus", 8, "GPUs per host (gpu).")
_TPU_TOPOLOGY = flags.DEFINE_string("tpu_topology", "2x2", "TPU topology (tpu).")
_TPU_TYPE = flags.DEFINE_string("tpu_type", "v5p", "TPU generation (tpu).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job as JSON; launch nothing.")


def _gin_passthrough(argv):
  return [a for a in argv[1:] if a.startswith("--gin.")]


def job_spec(argv) -> dict:
  """The job as plain data: the entry point, its arguments (the gin files, MODEL_DIR and
  every ``--gin.KEY=VALUE`` of ``argv``), and the accelerator it needs per host
  (``{gpu_type: count}`` or ``{tpu_type: topology}``)."""
  args = [f"--gin_file={g}" for g in _GIN_FILE.value]
  args += [f"--gin.MODEL_DIR={_MODEL_DIR.value}"] + _gin_passthrough(argv)
  if _ACCELERATOR.value == "gpu":
    requirements = {_GPU_TYPE.value: _GPUS.value}
  else:
    requirements = {_TPU_TYPE.value: _TPU_TOPOLOGY.value}
  return {"entrypoint": "retro_jax.train", "args": args, "accelerator": _ACCELERATOR.value,
          "requirements": requirements, "base_image": "python:3.11"}


def main(argv):
  spec = job_spec(argv)
  if _DRY_RUN.value:
    print(json.dumps(spec, indent=2))
    return
  # Optional: only the launching machine has xmanager.
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top

  if spec["accelerator"] == "gpu":
    requirements = xm.JobRequirements(**spec["requirements"])
  else:
    requirements = xm.JobRequirements(
        **{kind: xm.Topology(topology) for kind, topology in spec["requirements"].items()})
  with xm_local.create_experiment(experiment_title="retro_jax") as experiment:
    [executable] = experiment.package([
        xm.python_container(
            executor_spec=xm_local.Vertex.Spec(),
            path=".",
            base_image=spec["base_image"],
            entrypoint=xm.ModuleName(spec["entrypoint"]),
            use_deep_module=True,
        )
    ])
    experiment.add(xm.Job(executable=executable,
                          executor=xm_local.Vertex(requirements=requirements),
                          args=spec["args"]))


if __name__ == "__main__":
  # Keep --gin.KEY=VALUE for the job; absl would reject them here.
  known = [a for a in sys.argv if not a.startswith("--gin.")]
  app.run(lambda _: main(sys.argv), argv=known)
