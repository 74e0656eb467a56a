"""``--only-depths`` runs some columns of a needle grid with the prompts they have in the full
grid (passkeys are seeded by the depth's index in ``--depths``), so long prompts can run one per
command and still be the table's prompts; a depth not in ``--depths`` is a one-line error."""

from __future__ import annotations

import json

from slimlm.cli import main


def run(args, tmp_path, name):
    out = tmp_path / name
    assert main(["eval", "needle", *args, "--threads", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())["results"]


def test_only_depths_reruns_the_full_grids_prompts(tiny_llama_dir, tiny_data, tmp_path):
    base = ["--model", str(tiny_llama_dir), "--filler", str(tiny_data["filler"]), "--lengths", "150",
            "--depths", "0.2,0.5,0.8", "--trials", "1", "--seed", "3"]
    full = run(base, tmp_path, "full.json")
    one = run([*base, "--only-depths", "0.8"], tmp_path, "one.json")
    assert [t for t in full["trials"] if t["depth"] == 0.8] == one["trials"] and len(one["trials"]) == 1
    assert one["grid"]["150"]["0.2"] is None and one["grid"]["150"]["0.8"] == full["grid"]["150"]["0.8"]
    alone = run([*base[:-6], "--depths", "0.8", "--trials", "1", "--seed", "3"], tmp_path, "alone.json")
    assert alone["trials"][0]["key"] != one["trials"][0]["key"]  # index seeding: --depths 0.8 alone differs


def test_only_depths_outside_the_grid_is_one_line(tiny_llama_dir, tiny_data, capsys):
    argv = ["eval", "needle", "--model", str(tiny_llama_dir), "--filler", str(tiny_data["filler"]), "--lengths", "150",
            "--depths", "0.2,0.8", "--only-depths", "0.5", "--trials", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--only-depths 0.5 not among --depths" in err[-1]
