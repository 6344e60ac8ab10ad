"""The example notebooks: committed clean and valid, and they really run.

The notebooks are executed with nbclient after their ``parameters`` cell is rewritten (as
papermill would) to a tiny federation: ``single_machine.ipynb`` on the embedded broker, and
``aggregator.ipynb`` with two ``party.ipynb`` kernels over RabbitMQ. So the notebook path
of the Python API cannot rot unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import nbformat
import pytest

from messages.transport.connect import connect
from messages.transport.topology import Topology

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = ("aggregator.ipynb", "party.ipynb", "single_machine.ipynb")
TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}
MAX_VERSIONS = 6
KERNEL = "python3"
"""jupyter_client swaps a kernelspec's bare ``python`` for ``sys.executable``, so this kernel
runs the interpreter running pytest: the venv, with the project installed."""


def read(name: str) -> Any:
    return nbformat.read(EXAMPLES / name, as_version=4)  # type: ignore[no-untyped-call]


def parameters_cell(nb: Any) -> Any:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def defaults(nb: Any) -> dict[str, Any]:
    names: dict[str, Any] = {}
    exec(parameters_cell(nb).source, names)
    return {k: v for k, v in names.items() if not k.startswith("__")}


def set_parameters(nb: Any, **values: Any) -> None:
    """Rewrite the parameters cell; only names the notebook already has may be set."""
    params = defaults(nb)
    unknown = set(values) - set(params)
    assert not unknown, f"the notebook has no parameters {sorted(unknown)}"
    params.update(values)
    parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in params.items())


def client(nb: Any, cwd: Path) -> Any:
    from nbclient import NotebookClient

    return NotebookClient(nb, kernel_name=KERNEL, timeout=180,
                          resources={"metadata": {"path": str(cwd)}})


def stdout(nb: Any, containing: str) -> str:
    """The printed output of the code cell whose source contains ``containing``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and containing in c.source]
    assert len(cells) == 1, containing
    return "".join(o.text for o in cells[0].outputs
                   if o.output_type == "stream" and o.name == "stdout")


def assert_no_errors(nb: Any) -> None:
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors


def assert_saved(nb: Any, runs: Path) -> None:
    """The last cell printed the saved version, and the run left its three files."""
    final = stdout(nb, "global_model().save")
    match = re.fullmatch(rf"saved version {MAX_VERSIONS} \(test accuracy ([01]\.\d+)\) "
                         r"to (.+)\n", final)
    assert match, final
    assert 0 <= float(match.group(1)) <= 1
    assert Path(match.group(2)) == runs / "global.keras"
    assert (runs / "global.keras").stat().st_size > 0
    assert (runs / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    log = [json.loads(line) for line in (runs / "eval.jsonl").read_text().splitlines()]
    assert log[-1]["version"] == MAX_VERSIONS
    assert f"{log[-1]['accuracy']:.4f}" == match.group(1)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 1


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_committed_without_outputs(name: str) -> None:
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == KERNEL
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name}: clear the outputs before committing"
    assert defaults(nb)  # one parameters cell, plain assignments


def test_party_notebook_is_parametrised_by_party_id() -> None:
    assert defaults(read("party.ipynb"))["party_id"] == 0


def test_single_machine_defaults_to_a_real_mnist_run() -> None:
    params = defaults(read("single_machine.ipynb"))
    assert params["model"] == "worker.models:mnist_cnn"
    assert params["data"] == "worker.data:load_mnist"
    assert params["data_dir"] is None and params["broker"] == "memory://"
    assert params["target_accuracy"] == 0.98 and params["max_versions"] is None


@pytest.mark.slow
def test_single_machine_notebook_runs_a_tiny_federation(tmp_path: Path) -> None:
    nb = read("single_machine.ipynb")
    runs = tmp_path / "runs"
    set_parameters(nb, broker=f"memory://{uuid.uuid4().hex[:8]}", num_parties=2,
                   target_accuracy=None, max_seconds=120.0, max_versions=MAX_VERSIONS,
                   local_steps=5, eval_every_seconds=0.5, output_dir=str(runs), **TINY)
    client(nb, tmp_path).execute()

    assert_no_errors(nb)
    assert "released to 2 parties" in stdout(nb, "agg.start_training()")
    progress = stdout(nb, "show_new_evaluations()")
    assert re.search(rf"^\s*[\d.]+ s  version\s+{MAX_VERSIONS}  accuracy 0\.\d{{4}}", progress,
                     re.MULTILINE), progress
    assert re.search(rf": version {MAX_VERSIONS}, \d+ updates$", progress, re.MULTILINE)
    for party in (0, 1):
        assert re.search(rf"^party {party}: [1-9]\d* updates sent, last model version \d+ "
                         r"\(aggregator", progress, re.MULTILINE), progress
    assert_saved(nb, runs)


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_aggregator_and_party_notebooks_train_over_rabbitmq(
        amqp_url: str, federation: str, tmp_path: Path) -> None:
    common = {"broker": amqp_url, "federation": federation, **TINY}
    aggregator = read("aggregator.ipynb")
    runs = tmp_path / "runs"
    set_parameters(aggregator, num_parties=2, target_accuracy=None, max_seconds=120.0,
                   max_versions=MAX_VERSIONS, output_dir=str(runs), **common)
    parties = []
    for party_id in (0, 1):
        nb = read("party.ipynb")
        set_parameters(nb, party_id=party_id, num_parties=2, **common)
        parties.append(nb)

    async def run_all() -> None:
        await asyncio.gather(*(client(nb, tmp_path).async_execute()
                               for nb in (aggregator, *parties)))

    try:
        asyncio.run(run_all())
    finally:
        with connect(amqp_url) as b:
            t = Topology(federation)
            for q in (t.updates, t.control, t.dead):
                b.delete_queue(q)

    for nb in (aggregator, *parties):
        assert_no_errors(nb)
    assert "released to 2 parties" in stdout(aggregator, "agg.start_training()")
    watched = stdout(aggregator, "show_new_evaluations()")
    assert re.search(rf": version {MAX_VERSIONS}, \d+ updates", watched), watched
    assert_saved(aggregator, runs)
    for party_id, nb in enumerate(parties):
        done = stdout(nb, "worker.wait(")
        assert re.search(rf"^party {party_id} done: aggregator", done, re.MULTILINE), done
        stats = [c for c in nb.cells if c.cell_type == "code"][-1].outputs
        assert re.search(r"WorkerStats\(updates_sent=[1-9]", stats[0].data["text/plain"])
