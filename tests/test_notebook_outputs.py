"Every chapter's saved outputs come from one top-to-bottom run in full mode of the notebook as it is now."
import json
from pathlib import Path

import pytest

from fundus_lab.core import code_fingerprint

NBS = Path(__file__).parents[1] / "nbs"
CHAPTERS = sorted(p for p in NBS.glob("[0-9]*.ipynb"))


def saved_text(output:dict) -> str:
    "The text of one saved output: markdown or plain text of a result, or a stream."
    if "text" in output: return "".join(output["text"])
    data = output.get("data", {})
    return "".join(data.get("text/markdown", data.get("text/plain", "")))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_outputs_come_from_a_full_run(chapter):
    code = [c for c in json.loads(chapter.read_text())["cells"] if c["cell_type"] == "code"]
    marker = code[-1]
    assert "execution_record()" in "".join(marker["source"]), \
        f"{chapter.name}: the last code cell must call `execution_record()` (see the core chapter)"
    saved = "".join(saved_text(o) for o in marker["outputs"])
    cells, fingerprint = code_fingerprint(["".join(c["source"]) for c in code[:-1]])
    assert saved == f"Outputs from one run in full mode: {cells} code cells, fingerprint `{fingerprint}`.", (
        f"{chapter.name}: its saved outputs are not from one full-mode run of this version (record: {saved!r}); "
        f"run `make execute NB=nbs/{chapter.name}` and commit the result")
    errors = [i for i, c in enumerate(code) for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{chapter.name}: code cells {errors} saved an error"
