"""A run stored in a compare folder, its record edited, then executed again: how the tests of stored records
(tests/cli/test_cli.py, tests/cli/test_costs.py) see whether a record was reused or trained again."""
from __future__ import annotations

import json

from sparsekern.cli.data import load_dataset
from sparsekern.cli.runs import Job, RunStore, execute, key


def stored_and_run_again(tmp_path, config, damage=lambda record: None):
    """Stores `config`'s run in a compare folder under `tmp_path`, lets `damage` change its JSON record in place,
    then executes the job again: (whether it trained again, the records execute returned)."""
    store = RunStore(str(tmp_path / "runs"))
    execute([Job(config)], store, load_dataset("digits"))
    path = tmp_path / "runs" / f"{key(config)}.json"
    record = json.loads(path.read_text())
    damage(record)
    path.write_text(json.dumps(record))
    trained = []
    records = execute([Job(config)], store, load_dataset("digits"),
                      on_done=lambda job, record, new: trained.append(new))
    return trained, records
