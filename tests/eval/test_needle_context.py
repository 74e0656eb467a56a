"""``slimlm eval needle`` past the trained context: the CLI prints a note for each length past the
trained range and for each length skipped (naming ``--rope-extension``); DCA and sparse prefill
settings that cannot work (a chunk size at or past the trained context, a local window as long as
the chunk, a non-positive sparse budget) are one ``error:`` line and exit 2, no traceback."""

from __future__ import annotations

import pytest

from slimlm.cli import main


def needle(model, data, *extra):
    return ["eval", "needle", "--model", str(model), "--filler", str(data["filler"]), "--depths", "0.5",
            "--trials", "1", "--threads", "1", *extra]


def test_the_cli_prints_the_trained_range_and_skipped_notes(tiny_llama_dir, tiny_data, capsys):
    argv = needle(tiny_llama_dir, tiny_data, "--lengths", "200,400,700", "--rope-extension", "dca",
                  "--rope-extension-arg", "chunk_size=128", "--rope-extension-arg", "context=512")
    assert main(argv) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: ")]
    assert any("length 400 is past the model's trained context (256)" in n for n in notes)
    assert not any("length 200 " in n for n in notes)  # inside the trained range: no note
    skipped = [n for n in notes if "length 700 skipped" in n]
    assert len(skipped) == 1 and "(512)" in skipped[0] and "--rope-extension" in skipped[0]


@pytest.mark.parametrize("extra, msg", [
    (["--rope-extension", "dca", "--rope-extension-arg", "chunk_size=256"], "must be below the trained context (256)"),
    (["--rope-extension", "dca", "--rope-extension-arg", "chunk_size=4096"], "must be below the trained context (256)"),
    (["--rope-extension", "dca", "--rope-extension-arg", "chunk_size=64", "--rope-extension-arg", "local_window=64"],
     "local_window < chunk_size"),
    (["--rope-extension", "dca", "--rope-extension-arg", "context=1"], "context must be at least 2"),
    (["--rope-extension", "dca", "--sparse-prefill", "vertical-slash", "--rope-extension-arg", "chunk_size=300"],
     "must be below the trained context"),
    (["--rope-extension", "dca", "--sparse-prefill", "vertical-slash", "--sparse-prefill-arg", "vertical=0"],
     "positive integer"),
    (["--sparse-prefill-arg", "vertical=8"], "without sparse_prefill"),
])
def test_bad_dca_and_sparse_settings_are_one_line(tiny_llama_dir, tiny_data, capsys, extra, msg):
    assert main(needle(tiny_llama_dir, tiny_data, "--lengths", "200", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
